"""What an agent holds, read through its own REST API, bpftool and `ip link`: the state a refused
request (or a restart) must leave exactly as it was.

Covers networks, endpoints, IPAM, identities, the policy repository and its revision, services,
the links the instance owns, its persisted state files and the contents of its pinned
kernel maps. Leaves out what changes on its own: counters, conntrack, per-flow and per-socket
balancer state, the event ring, timestamps of Docker syncs, the monitor switches in cg_config, and
the host's addresses in the ipcache (they follow the machine's interfaces, other agents' too).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from plugin.client import Client
from tests.e2e.harness import run, wait_until

HOST_IDENTITY = 1  # reserved:host (datapath/identity.py HOST)
# Maps whose contents move with traffic or time, not with requests.
VOLATILE_MAPS = frozenset({"cg_ct", "cg_events", "cg_metrics", "cg_lb_flows", "cg_lb_sock"})
# cg_config.flags bits that monitors and flow followers switch (datapath/kernel/layout.py CG_CFG_TRACE, _QUIET).
MONITOR_FLAGS = 0x1 | 0x2
# State files that are the agent's own bookkeeping, not state a request makes.
VOLATILE_FILES = ("agent.lock", "proxy/", "journal")  # the journal: a log of writes the files already hold


class Instance(Protocol):
    """What a snapshot needs of an agent: harness.Agent has all of it."""

    name: str
    api: Path
    bpf: Path
    state: Path


class Node:
    """A simulated cluster node (tests/simcluster.SimNode) seen as an Instance; its links are in `netns`."""

    def __init__(self, name: str, api: str, bpf: str, state: str, netns: str = "") -> None:
        self.name, self.api, self.bpf, self.state, self.netns = name, Path(api), Path(bpf), Path(state), netns


def snapshot(agent: Instance, labels: bool = True) -> dict[str, Any]:
    """Everything a request may change. `labels`: first wait until every joined endpoint has its
    container's labels (they arrive through Docker's events stream, after `docker run` returns)."""
    api = Client(str(agent.api), timeout=30)
    if labels:
        wait_until(
            lambda: all(e["labels"] for e in api.get("/v1/endpoints") if e["sandbox"]), what="containers' labels"
        )
    return {
        "networks": api.get("/v1/networks"),
        "endpoints": api.get("/v1/endpoints"),
        "ipam": api.get("/v1/ipam"),
        "identities": api.get("/v1/identities"),
        "policy": api.get("/v1/policy"),  # the repository's revision and rules
        "services": api.get("/v1/services"),
        "links": links(agent.name, getattr(agent, "netns", "")),
        "state_files": state_files(agent.state),
        "maps": kernel_maps(agent.bpf),
    }


def links(name: str, netns: str = "") -> list[str]:
    """`ip -d link` lines (but the index) of the links instance `name` owns (alias cellgate:NAME:)."""
    out = run("ip", *(("-n", netns) if netns else ()), "-o", "-d", "link").stdout
    return sorted(line.split(": ", 1)[1] for line in out.splitlines() if f"alias cellgate:{name}:" in line)


def state_files(root: Path) -> dict[str, str]:
    """Path -> sha256 of every persisted document (VOLATILE_FILES left out)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not rel.startswith(VOLATILE_FILES):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def kernel_maps(bpf_dir: Path) -> dict[str, list[Any]]:
    """The entries of every pinned map but the volatile ones, as bpftool prints them (with BTF: by
    field), in a stable order; the host's own addresses left out of the ipcache. One bpftool for all."""
    pins = sorted(p for p in bpf_dir.iterdir() if p.is_file() and p.name not in VOLATILE_MAPS)
    script = "".join(f"map dump pinned {pin}\n" for pin in pins)
    proc = subprocess.run(
        ["bpftool", "-j", "batch", "file", "-"], input=script, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"bpftool batch: {proc.stdout[-300:]} {proc.stderr[-300:]}"
    maps = {}
    for pin, result in zip(pins, json.loads(proc.stdout), strict=True):
        entries = [_entry(pin.name, e) for e in result["output"]]
        if pin.name == "cg_ipcache":
            entries = [e for e in entries if _mine(_identity(e))]
        maps[pin.name] = sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))
    maps["progs"] = sorted(p.name for p in (bpf_dir / "progs").iterdir()) if (bpf_dir / "progs").is_dir() else []
    return maps


def _entry(name: str, raw: Mapping[str, Any]) -> Any:
    entry = raw.get("formatted") or {"key": raw.get("key"), "value": raw.get("value", raw.get("values"))}
    if name == "cg_config" and isinstance(entry.get("value"), dict):
        value = dict(entry["value"])
        value["flags"] = value.get("flags", 0) & ~MONITOR_FLAGS
        entry = {**entry, "value": value}
    return entry


def _mine(identity: int | None) -> bool:
    """Whether an ipcache entry is the agent's to keep: all but the host's addresses, which follow the
    machine's interfaces (other agents' gateways come and go with them) and are read again at a start."""
    return identity != HOST_IDENTITY


def _identity(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("value")
    return value.get("identity") if isinstance(value, dict) else None


def across_restart(snap: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot as a restarted agent must reproduce it: a start bumps the datapath's verdict-cache
    revision (cg_config.policy_rev) once, whatever the policy; everything else must be as it was."""
    out = copy.deepcopy(dict(snap))
    for entry in out.get("maps", {}).get("cg_config", []):
        if isinstance(entry.get("value"), dict):
            entry["value"]["policy_rev"] = None
    return out


def differences(before: Mapping[str, Any], after: Mapping[str, Any], limit: int = 3) -> list[str]:
    """What changed between two snapshots, part by part (map by map), briefly: for failure messages."""
    out = []
    for part in sorted(set(before) | set(after)):
        old, new = before.get(part), after.get(part)
        if part == "maps" and isinstance(old, dict) and isinstance(new, dict):
            out += [
                f"map {m}: {_brief(old.get(m), new.get(m))}"
                for m in sorted(set(old) | set(new))
                if old.get(m) != new.get(m)
            ]
        elif old != new:
            out.append(f"{part}: {_brief(old, new)}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _brief(old: Any, new: Any) -> str:
    if isinstance(old, list) and isinstance(new, list):
        gone = [x for x in old if x not in new]
        added = [x for x in new if x not in old]
        return f"removed {_short(gone)}, added {_short(added)}"
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:4])
    return f"{_short(old)} -> {_short(new)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:300] + "..."
