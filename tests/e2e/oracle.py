"""The oracle of the fault tier (tests/e2e/test_faults.py): what must hold after a fault and the
agent's recovery, checked against the agent's API, Docker and the kernel, never against logs.

- No address leaked or duplicated: the ledger's endpoint allocations are exactly the addresses of
  the live endpoints, Docker's containers hold exactly those, and no two hold one address.
- No stale endpoint: every endpoint has its container or CNI attachment, and every host veth,
  kernel map entry and route of the instance has its endpoint.
- No policy bypass: a denied probe never connects, before, during (`Watch`, in the background)
  and after the fault.
- Every allowed probe connects again within `RECOVERY` seconds of the agent being ready; the time
  it took is recorded in `TIMES` for the module's report.
- Resource counts back to a baseline taken before the fault: links, routes, network namespaces,
  pins, the agent's open descriptors and threads. Both readings follow the same warm-up, which
  grows each socket's request thread pool (started on demand, never shrunk) to the same size.

Probes are TCP connects made by small prober processes inside the namespaces the tests made;
nothing is sent anywhere else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath import naming
from plugin.client import Client
from plugin.server import UnixServer
from tests.e2e.harness import Dockerd, run, wait_until

RECOVERY = 5.0  # seconds within which every allowed probe connects again once the agent is ready
SETTLE = 30.0  # seconds the state may take to become consistent (Docker's retried calls land)
WARM = UnixServer.WORKERS  # requests held open at once on each socket by the warm-up: its pool's maximum
RESERVED_IDENTITIES = 256  # identities below are reserved (host, world, init, ...)
HOST_VETH = re.compile(r"^cg[0-9a-f]{13}$")
REVISION = re.compile(r"(?<![0-9a-f])[0-9a-f]{16}(?![0-9a-f])")  # a datapath revision in a pin's name
# pyroute2's state of each thread that used it: an event loop (epoll, a socket pair) and netlink sockets
PER_THREAD_KINDS = ("socket (netlink)", "anon_inode:[eventpoll]", "socket (unix) to cellgate")
PER_THREAD = 5  # at most, each
# descriptors an agent holds at most one of, opened when first needed: the state journal (at the first
# write) and the proxy supervisor's pidfd of a proxy it adopted from an earlier agent (one it started
# itself it waits for as its child)
SINGLETONS = ("/journal", "anon_inode:[pidfd]")
TIMES: list[tuple[str, float]] = []  # (what recovered, seconds from agent ready to every allowed probe connecting)

PROBER = r"""
import socket, sys
for line in sys.stdin:
    host, port, timeout = line.split()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(float(timeout))
        try:
            s.connect((host, int(port)))
            ok = 1
        except OSError:
            ok = 0
    print(ok, flush=True)
"""


# -- probes -----------------------------------------------------------------------------------


class Prober:
    """A process inside one network namespace that opens TCP connections when asked (one at a time)."""

    def __init__(self, name: str, enter: Sequence[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [*enter, "/usr/bin/python3", "-u", "-c", PROBER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()

    @classmethod
    def in_process_netns(cls, name: str, pid: int) -> Prober:
        """In the network namespace of process `pid` (a container's)."""
        return cls(name, ["nsenter", "-t", str(pid), "-n"])

    @classmethod
    def in_netns(cls, name: str, netns: str) -> Prober:
        """In the named namespace `netns` (`ip netns add`)."""
        return cls(name, ["ip", "netns", "exec", netns])

    def connects(self, address: str, port: int, timeout: float) -> bool:
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(f"{address} {port} {timeout}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"prober {self.name} exited ({self.proc.poll()})")
        return line.strip() == "1"

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@dataclass(frozen=True)
class Probe:
    """A TCP connect from a prober's namespace to address:port."""

    src: Prober
    address: str
    port: int
    label: str

    def connects(self, timeout: float = 0.5) -> bool:
        return self.src.connects(self.address, self.port, timeout)

    def __str__(self) -> str:
        return self.label


class Watch:
    """Denied probes back to back in a thread for as long as the block runs: none may connect.
    A probe that cannot be run (its prober gone) is an error too, reported at the end."""

    def __init__(self, denied: Sequence[Probe], timeout: float = 0.3) -> None:
        self.denied = list(denied)
        self.timeout = timeout
        self.rounds = 0
        self.bypasses: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cg-watch", daemon=True)

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            for probe in self.denied:
                try:
                    if probe.connects(self.timeout):
                        self.bypasses.append((round(time.monotonic() - started, 2), str(probe)))
                except Exception as exc:  # reported by check()
                    self.errors.append(exc)
                    return
            self.rounds += 1

    def __enter__(self) -> Watch:
        if self.denied:
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        if self.denied:
            self._thread.join(timeout=30)
        if exc_type is None:
            self.check()

    def check(self) -> None:
        assert not self.bypasses, f"denied probes connected during the fault (second, probe): {self.bypasses}"
        assert not self.errors, f"the watch could not probe: {self.errors}"
        assert not self.denied or self.rounds >= 1, "the watch never completed a round of denied probes"


def assert_denied(denied: Sequence[Probe]) -> None:
    connected = [str(p) for p in denied if p.connects(0.3)]
    assert not connected, f"denied probes connected: {connected}"


def allowed_again(allowed: Sequence[Probe], since: float, what: str) -> float:
    """Wait until every allowed probe connects, at most RECOVERY seconds after `since` (the moment
    the agent was ready); records and returns how long it took."""

    def failing() -> list[str]:
        return [str(p) for p in allowed if not p.connects(0.5)]

    last: list[str] = []

    def ok() -> bool:
        nonlocal last
        last = failing()
        return not last

    wait_until(ok, max(0.5, since + RECOVERY - time.monotonic()), f"allowed probes to connect ({what})", every=0.05)
    took = time.monotonic() - since
    TIMES.append((what, took))
    assert took <= RECOVERY + 0.5, f"allowed probes took {took:.2f} s to connect again ({what}); still failing: {last}"
    return took


# -- the agent as the oracle sees it ----------------------------------------------------------


@dataclass
class Target:
    """One agent: its instance name, sockets, pins, process, namespace and (maybe) its dockerd."""

    name: str
    api: Path
    plugin: Path
    bpf: Path
    pid: Callable[[], int]
    netns: str = ""  # the agent's network namespace ("" = the host's)
    dockerd: Dockerd | None = None
    namespaces: Callable[[], list[str]] = field(default=list)  # the network namespaces the scene holds

    @classmethod
    def of(
        cls, agent: Any, dockerd: Dockerd | None = None, namespaces: Callable[[], list[str]] | None = None
    ) -> Target:
        """A harness Agent (tests.e2e.harness.Agent)."""

        def pid() -> int:
            assert agent.proc is not None, "the agent is not running"
            return int(agent.proc.pid)

        return cls(agent.name, agent.api, agent.plugin, agent.bpf, pid, "", dockerd, namespaces or list)

    @classmethod
    def of_node(cls, cluster: Any, node: Any) -> Target:
        """A node of a simulated cluster (tests.simcluster): its agent runs in the node's namespace."""
        endpoints = f"/run/netns/cg{cluster.tag}e"

        def namespaces() -> list[str]:
            points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
            return sorted({p for p in points if p.startswith(endpoints)})

        return cls(
            node.name,
            Path(node.api_socket),
            Path(node.base) / "plugin.sock",
            Path(node.bpf_dir),
            lambda: int(node.pid),
            node.netns,
            None,
            namespaces,
        )

    def get(self, path: str) -> Any:
        """A GET of the agent's REST API (what `cellgate ... -o json` prints), without a CLI process."""
        return Client(str(self.api), timeout=60).get(path)

    def post(self, path: str, body: Any) -> Any:
        return Client(str(self.api), timeout=60).post(path, body)

    def ip(self, *args: str) -> Any:
        ns = ["-n", self.netns] if self.netns else []
        return json.loads(run("ip", *ns, "-j", *args).stdout or "[]")

    def links(self) -> dict[str, dict[str, Any]]:
        """Links of this instance by name: tagged with its alias, or in its link group (a link
        made in one request and tagged in the next carries the group from the first)."""
        tag, group = naming.link_tag(self.name), naming.link_group(self.name)
        groups = {str(group), str(group - (1 << 32))}
        return {
            link["ifname"]: link
            for link in self.ip("-d", "link", "show")
            if str(link.get("ifalias", "")).startswith(tag) or str(link.get("group", "")) in groups
        }

    def routes(self, devices: set[str]) -> list[dict[str, Any]]:
        """Routes this instance installed (protocol 203) on its devices or in its proxy table."""
        table = str(naming.proxy_table(self.name))
        out = []
        for family in ("-4", "-6"):
            for route in self.ip(family, "route", "show", "table", "all"):
                if str(route.get("protocol")) != str(naming.RTPROT_CELLGATE):
                    continue
                if route.get("dev") in devices or str(route.get("table")) == table:
                    out.append(route | {"family": family})
        return out

    def dump(self, name: str) -> list[dict[str, Any]]:
        """The entries of one pinned map, as bpftool formats them."""
        out = run("bpftool", "-j", "map", "dump", "pinned", str(self.bpf / name), check=False)
        if out.returncode != 0:
            raise AssertionError(f"cannot read the pinned map {self.bpf / name}: {out.stderr.strip()}")
        return [e["formatted"] for e in json.loads(out.stdout or "[]")]

    def proc_count(self, what: str) -> int:
        return len(os.listdir(f"/proc/{self.pid()}/{what}"))

    def fd_kinds(self) -> tuple[tuple[str, int], ...]:
        """The agent's descriptors by what they are (socket, bpf-map, a file's path, ...)."""
        pid = self.pid()
        sockets: dict[str, str] = {}  # inode -> protocol (and a unix socket's path)
        for proto in ("unix", "tcp", "tcp6", "udp", "udp6", "netlink", "raw"):
            try:
                rows = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                f = row.split()
                inode = f[6] if proto == "unix" else f[9] if proto not in ("netlink",) else f[-1]
                sockets[inode] = f"{proto} {f[7]}" if proto == "unix" and len(f) > 7 else proto
        peers = _unix_peers()
        kinds: dict[str, int] = {}
        base = f"/proc/{pid}/fd"
        for fd in os.listdir(base):
            try:
                target = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            found = re.fullmatch(r"socket:\[(\d+)\]", target)
            kind = f"socket ({sockets.get(found.group(1), '?')})" if found else re.sub(r"\[\d+\]$", "", target)
            if kind == "socket (unix)":
                kind += f" to {peers.get(found.group(1), 'nothing')}" if found else ""
            kinds[kind] = kinds.get(kind, 0) + 1
        return tuple(sorted(kinds.items()))


# -- what must hold ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What the instance holds on the host, counted."""

    links: int
    routes: int
    netns: int
    pins: tuple[str, ...]  # relative paths, a revision in them written as <revision>
    fds: int  # the agent's descriptors, but those below
    # pyroute2 keeps, for each thread that used the shared IPRoute, an event loop (an epoll and a socket
    # pair to itself) and netlink sockets, never freed (plugin/server.py bounds them by its pools)
    per_thread: int
    singletons: int  # SINGLETONS, each at most once
    threads: int
    fd_kinds: tuple[tuple[str, int], ...] = ()  # what the descriptors are, for the message only
    netns_names: tuple[str, ...] = ()  # for the message only

    def differences(self, base: Resources) -> list[str]:
        out = [
            f"{name}: {getattr(self, name)} now, {getattr(base, name)} before"
            for name in ("links", "routes", "netns", "pins")
            if getattr(self, name) != getattr(base, name)
        ]
        if self.netns != base.netns:
            out.append(f"namespaces now: {', '.join(self.netns_names)}; before: {', '.join(base.netns_names)}")
        # the agent's own: fewer is no leak (a transient descriptor may have been open before)
        out += [
            f"agent {name}: {getattr(self, name)} now, {getattr(base, name)} before"
            for name in ("fds", "threads")
            if getattr(self, name) > getattr(base, name)
        ]
        if self.per_thread > max(base.per_thread, PER_THREAD * self.threads):
            out.append(f"agent per-thread descriptors: {self.per_thread} now, for {self.threads} threads")
        extra = [kind for kind, n in self.fd_kinds if n > 1 and kind.endswith(SINGLETONS)]
        if extra:
            out.append(f"open more than once: {', '.join(extra)}")
        if out:
            now, then = dict(self.fd_kinds), dict(base.fd_kinds)
            changed = [
                f"{kind} {now.get(kind, 0) - then.get(kind, 0):+d}"
                for kind in sorted(now.keys() | then.keys())
                if now.get(kind, 0) != then.get(kind, 0)
            ]
            if changed:
                out.append("descriptors now - before: " + ", ".join(changed))
        return out


class Oracle:
    def __init__(self, target: Target) -> None:
        self.t = target

    # -- addresses and endpoints --------------------------------------------------------------

    def problems(self, cni: set[str] | None = None) -> list[str]:
        """Every violated invariant, in words (empty: all hold). `cni`: the endpoint IDs of the CNI
        attachments the runtime holds (None: not judged)."""
        t = self.t
        endpoints = t.get("/v1/endpoints")
        pools = t.get("/v1/ipam")["pools"]
        networks = t.get("/v1/networks")
        out: list[str] = []

        holders: dict[str, list[str]] = {}
        for ep in endpoints:
            for key in ("ipv4", "ipv6"):
                if ep[key]:
                    holders.setdefault(ep[key].split("/")[0], []).append(ep["id"])
        out += [
            f"address {a} is held by endpoints {', '.join(e[:12] for e in ids)}"
            for a, ids in holders.items()
            if len(ids) > 1
        ]
        allocated = {a["address"]: a["owner"] for p in pools for a in p["allocations"] if a["kind"] == "endpoint"}
        out += [
            f"address {a} is allocated (owner {allocated[a][:12] or 'none'}) but no endpoint holds it: leaked"
            for a in sorted(allocated.keys() - holders.keys())
        ]
        out += [
            f"address {a} of endpoint {holders[a][0][:12]} is not allocated: it could be handed out again"
            for a in sorted(holders.keys() - allocated.keys())
        ]
        out += [
            f"address {a} is allocated to {allocated[a][:12] or 'nobody'} but held by {holders[a][0][:12]}"
            for a in sorted(holders.keys() & allocated.keys())
            if allocated[a] not in holders[a]
        ]

        if t.dockerd is not None:
            out += self._docker_problems(endpoints, networks)
        if cni is not None:
            mine = {e["id"] for e in endpoints if e["origin"] == "cni"}
            out += [f"CNI endpoint {e[:12]} has no attachment: stale" for e in sorted(mine - cni)]
            out += [f"the CNI attachment of endpoint {e[:12]} is unknown to the agent" for e in sorted(cni - mine)]

        check = t.post("/v1/ipam/check", {"release": False, "grace": 0})
        if not check["ok"]:
            out.append(f"ipam check: {json.dumps({k: check.get(k) for k in ('leaked', 'missing', 'duplicates')})}")
        for kind in ("networks", "endpoints", "pools"):
            out += [f"ipam check: stale {kind[:-1]} {item}" for item in check["stale"][kind]]
        out += self._kernel_problems(endpoints, networks)
        return out

    def _docker_problems(self, endpoints: list[dict[str, Any]], networks: list[dict[str, Any]]) -> list[str]:
        d = self.t.dockerd
        assert d is not None
        out = []
        attached: dict[str, dict[str, Any]] = {}  # endpoint ID -> Docker's record of it
        docker_nets = set()
        for net in d("network", "ls", "-q", "--no-trunc", "--filter", f"driver={self.t.name}").split():
            info = json.loads(d("network", "inspect", net))[0]
            docker_nets.add(info["Id"])
            for cid, c in (info.get("Containers") or {}).items():
                attached[c["EndpointID"]] = c | {"container": cid}
        mine = {e["id"]: e for e in endpoints if e["origin"] == "docker"}
        out += [
            f"endpoint {e[:12]} ({mine[e]['interface']}) has no Docker container: stale"
            for e in sorted(mine.keys() - attached.keys())
        ]
        out += [
            f"container {attached[e]['Name']}'s endpoint {e[:12]} is unknown to the agent"
            for e in sorted(attached.keys() - mine.keys())
        ]
        for eid in mine.keys() & attached.keys():
            if attached[eid]["IPv4Address"] != mine[eid]["ipv4"]:
                out.append(
                    f"container {attached[eid]['Name']} has {attached[eid]['IPv4Address']} in Docker, "
                    f"{mine[eid]['ipv4']} in the agent"
                )
        used = [c["IPv4Address"].split("/")[0] for c in attached.values() if c["IPv4Address"]]
        out += [f"address {a} is held by two Docker containers" for a in sorted({a for a in used if used.count(a) > 1})]
        ours = {n["id"] for n in networks if n["origin"] == "docker"}
        out += [f"network {n[:12]} is gone from Docker: stale" for n in sorted(ours - docker_nets)]
        out += [f"Docker network {n[:12]} is unknown to the agent" for n in sorted(docker_nets - ours)]
        return out

    def _kernel_problems(self, endpoints: list[dict[str, Any]], networks: list[dict[str, Any]]) -> list[str]:
        t = self.t
        out = []
        tag = naming.link_tag(t.name)
        links = t.links()
        by_dev = {e["interface"]: e for e in endpoints}
        for name, link in sorted(links.items()):
            if not HOST_VETH.match(name):
                continue
            alias = str(link.get("ifalias", ""))
            if name not in by_dev:
                out.append(f"host veth {name} ({alias or 'untagged'}) has no endpoint: stale")
            elif alias != tag + by_dev[name]["id"]:
                out.append(f"host veth {name} carries {alias or 'no alias'}, not its endpoint's tag")
        out += [
            f"endpoint {e['id'][:12]} has no host veth {dev}" for dev, e in sorted(by_dev.items()) if dev not in links
        ]

        ifindex = {int(links[dev]["ifindex"]): dev for dev in by_dev if dev in links}
        sandboxes = {0}
        for entry in t.dump("cg_endpoints"):
            dev = ifindex.get(int(entry["key"]))
            if dev is None:
                out.append(f"cg_endpoints entry for ifindex {entry['key']} has no endpoint: stale")
                continue
            sandboxes.add(int(entry["value"]["sandbox"]))
            if int(entry["value"]["identity"]) != int(by_dev[dev]["identity"]):
                out.append(
                    f"cg_endpoints gives {dev} identity {entry['value']['identity']}, "
                    f"the agent {by_dev[dev]['identity']}"
                )
        out += [
            f"endpoint {by_dev[dev]['id'][:12]} has no cg_endpoints entry"
            for i, dev in sorted(ifindex.items())
            if i not in {int(e["key"]) for e in t.dump("cg_endpoints")}
        ]
        addresses = {a.split("/")[0] for e in endpoints for a in (e["ipv4"], e["ipv6"]) if a}
        in_map = set()
        for entry in t.dump("cg_ips"):
            key = entry["key"]
            raw = bytes(key["addr"][: 4 if key["family"] == 4 else 16])
            in_map.add(str(ipaddress.ip_address(raw)))
        out += [f"cg_ips holds {a}, which no endpoint has: stale" for a in sorted(in_map - addresses)]
        out += [f"cg_ips lacks {a} of a live endpoint" for a in sorted(addresses - in_map)]
        identities = {int(e["identity"]) for e in endpoints}
        stale_subjects = {int(e["key"]["subject"]) for e in t.dump("cg_policy")} - identities
        out += [
            f"cg_policy has entries for identity {s}, which no endpoint holds: stale"
            for s in sorted(stale_subjects)
            if s >= RESERVED_IDENTITIES
        ]
        served = {int(e["value"]) for e in t.dump("cg_lb_netns")}
        out += [f"cg_lb_netns serves a namespace (hash {h}) of no endpoint: stale" for h in sorted(served - sandboxes)]

        subnets = {s for n in networks for s in n["subnets"]}
        for route in t.routes(set(links)):
            dev, dst = route.get("dev"), str(route.get("dst"))
            if dev in by_dev:
                ep = by_dev[dev]
                own = {a.split("/")[0] for a in (ep["ipv4"], ep["ipv6"]) if a}
                if dst.split("/", maxsplit=1)[0] not in own:
                    out.append(f"route {dst} on {dev} is not its endpoint's address: stale")
            elif dev == naming.host_device(t.name) and dst not in subnets:
                out.append(f"route {dst} on {dev} is no network's subnet: stale")
            elif dev is not None and HOST_VETH.match(str(dev)):
                out.append(f"route {dst} on {dev} has no endpoint: stale")
        return out

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must leave exactly as it was: endpoints, networks, allocations,
        policy, identities, links, and the kernel's endpoint, address and policy maps."""
        t = self.t
        pools = t.get("/v1/ipam")["pools"]
        return {
            "endpoints": sorted(
                (e["id"], e["ipv4"], e["ipv6"], e["sandbox"], e["identity"], tuple(e["labels"]))
                for e in t.get("/v1/endpoints")
            ),
            "networks": sorted(n["id"] for n in t.get("/v1/networks")),
            "allocations": sorted(
                (p["id"], a["address"], a["kind"], a["owner"]) for p in pools for a in p["allocations"]
            ),
            "policy": t.get("/v1/policy"),
            "identities": sorted((i["id"], tuple(i["labels"])) for i in t.get("/v1/identities")),
            "links": sorted(t.links()),
            "maps": {
                m: sorted(json.dumps(e, sort_keys=True) for e in t.dump(m))
                for m in ("cg_endpoints", "cg_ips", "cg_policy")
            },
        }

    def consistent(self, cni: set[str] | None = None, timeout: float = SETTLE) -> None:
        """Wait (Docker's retried calls may still be landing) until every invariant holds."""
        last: list[str] = []

        def ok() -> bool:
            nonlocal last
            last = self.problems(cni)
            return not last

        try:
            wait_until(ok, timeout, "a consistent state", every=0.2)
        except AssertionError as exc:
            raise AssertionError("the state is not consistent:\n  " + "\n  ".join(last or [str(exc)])) from None

    # -- resources ----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """The same requests before a baseline and before the comparison. Each socket's request
        threads start on demand and never end (plugin/server.py), so their number is the most
        requests that socket served at once: WARM requests held open at once on each socket (a
        chunked body that never ends keeps a request thread reading) grow both pools to their
        maximum, whatever came before. Then ordinary calls of every kind the tests make."""
        held = []
        try:
            for path, route in ((self.t.plugin, "/NetworkDriver.GetCapabilities"), (self.t.api, "/v1/policy")):
                for _ in range(WARM):
                    sock = socket.socket(socket.AF_UNIX)
                    sock.settimeout(10)
                    sock.connect(str(path))
                    sock.sendall(
                        f"POST {route} HTTP/1.1\r\nHost: cellgate\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n".encode()
                    )
                    held.append(sock)
            _settled(lambda: self.t.proc_count("task"))  # every held request has its thread
        finally:
            for sock in held:
                sock.close()
        for path in ("/v1/status", "/v1/endpoints", "/v1/ipam", "/v1/networks", "/v1/policy", "/v1/identities"):
            self.t.get(path)
        assert _http(self.t.plugin, "POST", "/NetworkDriver.GetCapabilities") == 200
        _settled(lambda: self.t.proc_count("task"))

    def resources(self) -> Resources:
        t = self.t
        links = t.links()
        found = [str(p.relative_to(t.bpf)) for p in t.bpf.rglob("*")] if t.bpf.is_dir() else []
        pins = tuple(sorted(REVISION.sub("<revision>", p) for p in found))
        namespaces = tuple(sorted(t.namespaces()))
        kinds = t.fd_kinds()
        per_thread = sum(n for kind, n in kinds if kind in PER_THREAD_KINDS)
        singletons = sum(n for kind, n in kinds if kind.endswith(SINGLETONS))
        return Resources(
            links=len(links),
            routes=len(t.routes(set(links))),
            netns=len(namespaces),
            pins=pins,
            fds=_settled(lambda: t.proc_count("fd")) - per_thread - singletons,
            per_thread=per_thread,
            singletons=singletons,
            threads=_settled(lambda: t.proc_count("task")),
            fd_kinds=kinds,
            netns_names=namespaces,
        )

    def baseline(self) -> Resources:
        self.warm_up()
        return self.resources()

    def back_to(self, base: Resources, timeout: float = 10.0) -> None:
        """After the same warm-up, every count is back where `base` had it."""
        self.warm_up()
        last: list[str] = []

        def ok() -> bool:
            nonlocal last
            last = self.resources().differences(base)
            return not last

        try:
            wait_until(ok, timeout, "the resource counts to return to the baseline", every=0.2)
        except AssertionError as exc:
            raise AssertionError("resources not back to the baseline:\n  " + "\n  ".join(last or [str(exc)])) from None


def _unix_peers() -> dict[str, str]:
    """Unix stream sockets by inode -> the process at the other end (`ss`), for naming descriptors."""
    rows = [line.split() for line in run("ss", "-xpna", check=False).stdout.splitlines()[1:]]
    owner = {r[5]: (re.findall(r'"([^"]+)"', r[8]) or ["?"])[0] for r in rows if len(r) > 8}
    return {r[5]: owner.get(r[7], "nothing") for r in rows if len(r) > 7}


def _http(path: Path, method: str, route: str) -> int:
    """The status of one request on a unix socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(
            f"{method} {route} HTTP/1.1\r\nHost: cellgate\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1]) if head.startswith(b"HTTP/") else 0


def _settled(read: Callable[[], int], samples: int = 3, timeout: float = 5.0) -> int:
    """A count once it has stayed the same for `samples` readings in a row."""
    seen: list[int] = []

    def steady() -> bool:
        seen.append(read())
        return len(seen) >= samples and len(set(seen[-samples:])) == 1

    wait_until(steady, timeout, "a steady count", every=0.05)
    return seen[-1]
