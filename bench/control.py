"""Control-plane tier: agent start, endpoint and CNI paths, `docker run`, policy, map loads, RSS.

Everything runs against isolated agents (`cgb…` instance names, own sockets, state, pins
and chains) and a private dockerd; endpoints are CNI attachments made through the real
API in network namespaces this run creates (`ip netns add cgb…`), without containers.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from bench import rig
from bench.common import Cleanup, log, machine, new_tag, run, summary, timed, wait_until

IFACES_PER_NETNS = 100


class Api:
    """Timed calls to an agent's REST API: (wall ms, agent's own ms from Server-Timing, body)."""

    def __init__(self, sock: Path) -> None:
        from plugin.client import Client

        self.client = Client(str(sock), timeout=300)

    def call(self, method: str, path: str, body: Any = None) -> tuple[float, float, Any]:
        started = time.perf_counter()
        resp = self.client._request(method, path, body)
        raw = resp.read()
        wall = (time.perf_counter() - started) * 1000
        timing = resp.getheader("Server-Timing") or ""
        resp.close()
        payload = json.loads(raw) if raw else None
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {payload}")
        app = float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")
        return wall, app, payload


def remove_cache_dirs(pin_dir: Path) -> None:
    """Forget an agent's pinned programs, so that its next start compiles."""
    from datapath.kernel.loader import remove_cache

    cache = pin_dir / "cache"
    for revision in cache.iterdir() if cache.is_dir() else ():
        remove_cache(revision)


class Attachments:
    """CNI attachments of one network, spread over namespaces of IFACES_PER_NETNS interfaces."""

    def __init__(self, cleanup: Cleanup, tag: str, api: Api, network: str) -> None:
        self.cleanup, self.tag, self.api, self.network = cleanup, tag, api, network
        self.netns: list[str] = []
        self.count = 0

    def _where(self, index: int) -> tuple[str, str]:
        ns_index, slot = divmod(index, IFACES_PER_NETNS)
        while len(self.netns) <= ns_index:
            self.netns.append(rig.netns(self.cleanup, f"{self.tag}-n{len(self.netns)}"))
        return self.netns[ns_index], f"eth{slot}"

    def body(self, index: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
        ns, ifname = self._where(index)
        return {"network": self.network, "container_id": f"{self.tag}c{index}", "ifname": ifname,
                "netns": f"/run/netns/{ns}", "labels": labels or {}, "label_source": "cni"}

    def add(self, index: int, labels: dict[str, str] | None = None) -> tuple[float, float]:
        wall, app, _ = self.api.call("POST", "/v1/cni/add", self.body(index, labels))
        self.count += 1
        return wall, app

    def delete(self, index: int) -> tuple[float, float]:
        body = self.body(index)
        wall, app, _ = self.api.call("POST", "/v1/cni/del", {k: body[k] for k in
                                                              ("network", "container_id", "ifname", "netns")})
        return wall, app


def cni_exec(conf: dict[str, Any], command: str, att: dict[str, Any]) -> float:
    """Run the cellgate-cni binary as a runtime would; returns wall ms."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": att["container_id"], "CNI_NETNS": att["netns"], "CNI_IFNAME": att["ifname"],
           "CNI_PATH": str(Path(rig.CNI_BIN).parent)}
    started = time.perf_counter()
    proc = run(rig.CNI_BIN, check=False, env=env, input=json.dumps(conf), timeout=60)
    wall = (time.perf_counter() - started) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"cellgate-cni {command}: {proc.stdout} {proc.stderr}")
    return wall


def policy_rules(port_base: int, n_rules: int, n_endpoints: int) -> list[dict[str, Any]]:
    """n rules: endpoint e(i % N) accepts TCP on port_base + i // N from e(i+1 % N)."""
    rules = []
    for i in range(n_rules):
        rules.append({
            "labels": [{"key": "name", "value": f"cgb-r{i}"}],
            "endpointSelector": {"matchLabels": {"app": f"e{i % n_endpoints}"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": f"e{(i + 1) % n_endpoints}"}}],
                         "toPorts": [{"ports": [{"port": str(port_base + i // n_endpoints), "protocol": "TCP"}]}]}],
        })
    return rules


def run_control(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    runs = 5 if quick else 20
    rng = random.Random(seed or None)
    tag = new_tag()
    workdir = Path(f"/tmp/{tag}")
    samples: list[dict[str, Any]] = []
    out: dict[str, Any] = {"tier": "control", "machine": machine(), "started": time.time(), "quick": quick,
                           "tag": tag, "samples": samples}

    def add(metric: str, value: float, **extra: Any) -> None:
        samples.append({"metric": metric, "value": value, **extra})

    with Cleanup() as cleanup:
        workdir.mkdir(parents=True)
        cleanup.push(f"workdir {workdir}", run, "rm", "-rf", str(workdir), check=False)
        bridge_net = rig.free_subnet("198.18.0.0/15", 24, rng)
        v4 = rig.free_subnet("10.64.0.0/10", 20, rng)
        bridge = f"{tag}br"
        run("ip", "link", "add", bridge, "type", "bridge")
        cleanup.push(f"bridge {bridge}", run, "ip", "link", "del", bridge, check=False)
        run("ip", "addr", "add", f"{bridge_net.network_address + 1}/{bridge_net.prefixlen}", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        rr = rig.build_rr(workdir)
        dockerd = rig.Dockerd(cleanup, tag, bridge)
        image = dockerd.image(rr, f"{tag}/rr:1")
        agent = rig.Agent(cleanup, workdir, f"{tag}a", str(v4), f"fd63:cb:{rng.randrange(1 << 16):x}::/64",
                          docker_host=f"unix://{dockerd.sock}", extra=("--ipv4-network-size", "21"))
        agent.start()
        cleanup.push("containers and networks", dockerd.remove_containers)
        api = Api(agent.api)
        atts = Attachments(cleanup, tag, api, f"{tag}cni")

        # -- endpoint create/delete inside the agent, and CNI ADD/DEL through the binary ------
        with timed("endpoint and CNI paths"):
            for i in range(10):  # a network with ten endpoints for the restarts below
                atts.add(i)
            for i in range(runs * 2):
                wall, app = atts.add(1000 + i)
                add("endpoint_create_ms", app, wall_ms=wall, endpoints=10)
                wall, app = atts.delete(1000 + i)
                add("endpoint_delete_ms", app, wall_ms=wall, endpoints=10)
            conf = {"cniVersion": "1.0.0", "name": f"{tag}cni", "type": "cellgate-cni", "socket": str(agent.api)}
            for i in range(runs * 2):
                att = atts.body(2000 + i)
                add("cni_add_ms", cni_exec(conf, "ADD", att))
                add("cni_del_ms", cni_exec(conf, "DEL", att))

        # -- agent restart (the pinned programs reused) and first start (compiled), restoring one
        # network with ten endpoints -----------------------------------------------------------
        with timed("agent restarts"):
            for i in range(runs):
                agent.stop()
                seconds = agent.start()
                _, _, status = api.call("GET", "/v1/status")
                add("agent_restart_s", seconds, compile_ms=status["compile_ms"], start_ms=status["start_ms"],
                    endpoints=status["endpoints"], reused=status.get("datapath_reused"), run=i)
            for i in range(3 if quick else 5):  # no program cache: what a first start or an upgrade pays
                agent.stop()
                remove_cache_dirs(agent.bpf)
                seconds = agent.start()
                _, _, status = api.call("GET", "/v1/status")
                add("agent_start_s", seconds, compile_ms=status["compile_ms"], start_ms=status["start_ms"],
                    endpoints=status["endpoints"], reused=status.get("datapath_reused"), run=i)

        # -- docker run ... true, cellgate network against Docker's default bridge ---------------
        with timed("docker run"):
            dockerd("network", "create", "-d", agent.name, "--ipam-driver", agent.name, f"{tag}net")
            for kind in ("cellgate", "bridge") * 2:  # warm both paths first
                docker_true(dockerd, image, tag, kind)
            order = ["cellgate", "bridge"] * runs
            rng.shuffle(order)
            for kind in order:
                add(f"docker_run_{kind}_s", docker_true(dockerd, image, tag, kind))

        # -- policy import -> enforced: 1k rules over 100 endpoints ----------------------------
        with timed("policy import"):
            from datapath.kernel import layout
            from datapath.kernel.loader import Datapath

            for i in range(100):
                if i >= 10:
                    atts.add(i, {"app": f"e{i}"})
            for i in range(10):  # the first ten have no labels yet: give them theirs
                atts.delete(i)
                atts.add(i, {"app": f"e{i}"})
            view = Datapath(agent.bpf)  # the agent's pinned maps, opened from this process
            cleanup.push("map handles", view.close)
            identities = {int(e["identity"]) for e in api.call("GET", "/v1/endpoints")[2]}
            for i in range(runs + 1):
                port_base = 10000 + 20 * i
                rules = policy_rules(port_base, 1000, 100)
                probe = expected_key(api, layout, port_base)
                started = time.perf_counter()
                wall, app, reply = api.call("POST", "/v1/policy", {"rules": rules})
                wait_until(lambda p=probe: view.policy.get(p) is not None, 30, "the policy entry in the map",
                           every=0.0005)
                enforced = (time.perf_counter() - started) * 1000
                if i:  # the first import adds 1k rules to none; the rest replace 1k rules
                    add("policy_import_enforced_ms", enforced, wall_ms=wall, app_ms=app, rules=1000, endpoints=100,
                        revision=reply["revision"])
            rule_file = workdir / "rules.json"
            for i in range(max(3, runs // 4)):
                rule_file.write_text(json.dumps(policy_rules(20000 + 20 * i, 1000, 100)))
                started = time.perf_counter()
                run(rig.CELLGATE, "policy", "import", str(rule_file), "--socket", str(agent.api))
                add("policy_import_cli_s", time.perf_counter() - started, rules=1000)
            out["identities"] = len(identities)
            api.call("DELETE", "/v1/policy", {"all": True})

        # -- 100k policy entries through the agent's batch path ---------------------------------
        with timed("100k policy entries"):
            load_policy_entries(cleanup, tag, runs, add)

        agent.stop()
        # -- RSS at 1, 100, 1000 endpoints: a fresh agent --------------------------------------
        with timed("RSS"):
            targets = (1, 100) if quick else (1, 100, 1000)
            fresh = rig.Agent(cleanup, workdir, f"{tag}m", str(v4), f"fd63:cb:{rng.randrange(1 << 16):x}::/64",
                              extra=("--ipv4-network-size", "21"))
            fresh.start()
            add("rss_kib", fresh.rss_kib()["VmRSS"], endpoints=0, **fresh.rss_kib())
            mem_atts = Attachments(cleanup, tag + "m", Api(fresh.api), f"{tag}mem")
            made = 0
            for target in targets:
                while made < target:
                    wall, app = mem_atts.add(made, {"app": f"m{made % 50}"})
                    add("endpoint_create_at_scale_ms", app, wall_ms=wall, endpoints=made)
                    made += 1
                rss = fresh.rss_kib()
                add("rss_kib", rss["VmRSS"], endpoints=made, **rss)
                log.info("RSS at %d endpoints: %.0f MiB", made, rss["VmRSS"] / 1024)
            for i in range(made):
                wall, app = mem_atts.delete(i)
                add("endpoint_delete_at_scale_ms", app, wall_ms=wall, endpoints=made - i)
            fresh.stop()
    out["seconds"] = time.time() - out["started"]
    out["summary"] = summarize(samples)
    return out


def docker_true(dockerd: rig.Dockerd, image: str, tag: str, kind: str) -> float:
    net = ["--network", f"{tag}net"] if kind == "cellgate" else []
    started = time.perf_counter()
    dockerd("run", "--rm", *net, image, "true")
    return time.perf_counter() - started


def expected_key(api: Api, layout: Any, port_base: int) -> Any:
    """The kernel key of rule 0 of a set: e0 accepts TCP/port_base from e1."""
    from datapath.policy.compile import PolicyKey

    eps = api.call("GET", "/v1/endpoints")[2]
    by_app = {lbl.split("=", 1)[1]: int(e["identity"]) for e in eps for lbl in e["labels"]
              if lbl.startswith("cni:app=")}
    return layout.policy_key(PolicyKey(by_app["e0"], False, by_app["e1"], 6, port_base, 16))


def load_policy_entries(cleanup: Cleanup, tag: str, runs: int, add: Any) -> None:
    """Write and remove 100k entries with the agent's executor (batch writes) in a throwaway map."""
    from datapath.kernel import layout
    from datapath.kernel.executor import KernelExecutor
    from datapath.kernel.loader import Datapath, remove_pins
    from datapath.policy.compile import PolicyKey, PolicyValue

    pin = Path("/sys/fs/bpf") / f"{tag}p"
    cleanup.push(f"pins {pin}", remove_pins, pin)
    dp = Datapath(pin)
    cleanup.push("throwaway datapath", dp.close)
    executor = KernelExecutor(f"{tag}p", dp)
    cleanup.push("executor", executor.close)
    entries = {PolicyKey(0x00F00000 + i // 10_000, bool(i & 1), 0x00E00000 + i % 10_000, 6, 1 + i % 65000, 16):
               PolicyValue(False, 1) for i in range(100_000)}
    for i in range(runs):
        started = time.perf_counter()
        executor.policy_update(entries, [])
        add("policy_load_100k_s", time.perf_counter() - started, path="executor batch", run=i)
        started = time.perf_counter()
        executor.policy_update({}, list(entries))
        add("policy_unload_100k_s", time.perf_counter() - started, path="executor", run=i)
    keys = [layout.policy_key(k) for k in entries]
    value = layout.policy_value(PolicyValue(False, 1))
    for i in range(2):  # the reference: one syscall per entry
        started = time.perf_counter()
        for key in keys:
            dp.policy[key] = value
        add("policy_load_100k_per_element_s", time.perf_counter() - started, run=i)
        ktype = layout.CgPolicyKey
        arr = (ktype * len(keys))(*keys)
        for start in range(0, len(keys), 4096):
            n = min(4096, len(keys) - start)
            dp.policy.items_delete_batch((ktype * n).from_buffer(arr, start * ctypes.sizeof(ktype)))


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in sorted({s["metric"] for s in samples}):
        if metric == "rss_kib":
            out[metric] = {str(s["endpoints"]): s["value"] for s in samples if s["metric"] == metric}
            continue
        out[metric] = summary([s["value"] for s in samples if s["metric"] == metric])
    return out
