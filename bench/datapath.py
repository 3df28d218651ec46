"""Datapath tier: TCP_RR, TCP_CRR (and a stream, for information) across the configuration matrix.

  lo              loopback in one netns                                   (ceiling)
  vethpair        a veth pair straight between two netns                  (ceiling)
  vethpair_again  the same pair measured a second time in the round: the noise band
  routed          two netns routed through the root netns, no BPF        (baseline)
  docker_bridge   two containers on the private dockerd's default bridge
  ipt_1k/ipt_10k  the same bridge, 1k / 10k non-matching iptables rules before the ACCEPT
  ipt_10k_est     the 10k chain behind an ESTABLISHED,RELATED ACCEPT
  cg_open         two containers on a cellgate network, no rule selects them
  cg_policy       a pair both of whose sides are enforced by an L3/L4 rule allowing the flow
  cg_policy_100k  cg_policy with 100k more policy entries and 10k more identities in the maps
  *_ns            docker_bridge / cg_policy with client and server run by nsenter in the same
                  containers' network namespaces, outside their cgroups: the network path of
                  the container configurations, with processes placed exactly as in the netns ones

Each round runs every configuration once, in a freshly shuffled order; ratios are taken
against `routed` of the same round (paired). Servers run on CPU 1, clients on CPU 0.
The filler entries of cg_policy_100k are written straight into the agent's pinned maps
(batch updates through datapath.kernel.layout and a Datapath handle on the agent's pin
dir) and removed again when another configuration runs: subjects 0x00f00000+, peers and
ipcache identities 0x00e00000+ on /32s of 198.19.0.0/16, which no packet uses. The agent
leaves alone entries it never wrote.
"""

from __future__ import annotations

import ctypes
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import rig
from bench.common import Cleanup, log, machine, new_tag, run, timed, wait_until

MODES = ("rr", "crr", "stream")
PORT_RANGE = "net.ipv4.ip_local_port_range=1024 65000"
CONFIGS = ("lo", "vethpair", "vethpair_again", "routed", "docker_bridge", "ipt_1k", "ipt_10k", "ipt_10k_est",
           "cg_open", "cg_policy", "cg_policy_100k", "docker_bridge_ns", "cg_policy_ns")
NS_PORT = 5202  # the *_ns servers: same containers' netns, processes outside the containers
FILLER_POLICY, FILLER_IDENTITIES = 100_000, 10_000


@dataclass
class Config:
    name: str
    client: Callable[[str, float, float], dict[str, Any]]
    enter: Callable[[], None] = lambda: None
    agent_pid: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


class Rig:
    """Everything the matrix needs, built once per chunk and torn down by the Cleanup."""

    def __init__(self, cleanup: Cleanup, tag: str, rng: random.Random) -> None:
        self.cleanup, self.tag, self.rng = cleanup, tag, rng
        self.workdir = Path(f"/tmp/{tag}")
        self.workdir.mkdir(parents=True)
        cleanup.push(f"workdir {self.workdir}", run, "rm", "-rf", str(self.workdir), check=False)
        self.rr = rig.build_rr(self.workdir)
        self.server_cpu, self.client_cpu = rig.cpus()
        self.chain = f"CGB-{tag[3:]}"
        self.configs: dict[str, Config] = {}
        self.filled = False

    # -- plumbing --------------------------------------------------------------------------

    def _forwarding(self) -> None:
        path = Path("/proc/sys/net/ipv4/ip_forward")
        if path.read_text().strip() != "1":
            path.write_text("1")
            self.cleanup.push("ip_forward back to 0", path.write_text, "0")

    def _ns_client(self, ns: str, address: str) -> Callable[[str, float, float], dict[str, Any]]:
        def client(mode: str, seconds: float, warmup: float) -> dict[str, Any]:
            out = rig.ns_run(ns, str(self.rr), "-c", address, "-p", str(rig.RR_PORT), "-m", mode,
                             "-t", str(seconds), "-w", str(warmup), "-C", str(self.client_cpu),
                             timeout=seconds + warmup + 60)
            return rig.parse_rr(out.stdout)
        return client

    def _pid(self, container: str) -> int:
        return int(self.dockerd.inspect(container)["State"]["Pid"])

    def _nsenter_client(self, container: str, address: str) -> Callable[[str, float, float], dict[str, Any]]:
        """rr in `container`'s netns from the host (a server on NS_PORT is started alongside)."""
        netns = f"--net=/proc/{self._pid(container)}/ns/net"

        def client(mode: str, seconds: float, warmup: float) -> dict[str, Any]:
            out = run("nsenter", netns, str(self.rr), "-c", address, "-p", str(NS_PORT), "-m", mode,
                      "-t", str(seconds), "-w", str(warmup), "-C", str(self.client_cpu),
                      timeout=seconds + warmup + 60)
            return rig.parse_rr(out.stdout)
        return client

    def _nsenter_server(self, container: str) -> None:
        pid = self._pid(container)
        rig.Process(self.cleanup, ["nsenter", f"--net=/proc/{pid}/ns/net", str(self.rr), "-s", "-p", str(NS_PORT),
                                   "-C", str(self.server_cpu)], f"rr server in the netns of {container}")
        wait_until(lambda: f":{NS_PORT:X} " in Path(f"/proc/{pid}/net/tcp6").read_text(), 10,
                   f"rr server in the netns of {container}")

    def _docker_client(self, container: str, address: str) -> Callable[[str, float, float], dict[str, Any]]:
        def client(mode: str, seconds: float, warmup: float) -> dict[str, Any]:
            out = self.dockerd("exec", container, "/rr", "-c", address, "-p", str(rig.RR_PORT), "-m", mode,
                               "-t", str(seconds), "-w", str(warmup), "-C", str(self.client_cpu),
                               timeout=seconds + warmup + 60)
            return rig.parse_rr(out)
        return client

    # -- netns configurations --------------------------------------------------------------

    def build_netns(self) -> None:
        t = self.tag
        net = rig.free_subnet("198.18.0.0/15", 24, self.rng)
        a = lambda n: str(net.network_address + n)  # noqa: E731
        for ns in (f"{t}-lo", f"{t}-va", f"{t}-vb", f"{t}-ra", f"{t}-rb"):
            rig.netns(self.cleanup, ns)
            rig.ns_run(ns, "sysctl", "-qw", PORT_RANGE)
        rig.rr_server(self.cleanup, self.rr, f"{t}-lo")
        self.configs["lo"] = Config("lo", self._ns_client(f"{t}-lo", "127.0.0.1"))

        run("ip", "-n", f"{t}-va", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", f"{t}-vb")
        for ns, addr in ((f"{t}-va", a(1)), (f"{t}-vb", a(2))):
            run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        rig.rr_server(self.cleanup, self.rr, f"{t}-vb")
        self.configs["vethpair"] = Config("vethpair", self._ns_client(f"{t}-va", a(2)))
        # the ceiling again at another place in the round: how far two runs of one path differ
        self.configs["vethpair_again"] = Config("vethpair_again", self._ns_client(f"{t}-va", a(2)))

        self._forwarding()
        for side, host, inner, other in (("ra", 65, 66, 68), ("rb", 69, 70, 64)):
            rig.veth(self.cleanup, f"{t}{side}", "eth0", peer_ns=f"{t}-{side}")
            run("ip", "addr", "add", f"{a(host)}/30", "dev", f"{t}{side}")
            run("ip", "link", "set", f"{t}{side}", "up")
            run("ip", "-n", f"{t}-{side}", "addr", "add", f"{a(inner)}/30", "dev", "eth0")
            run("ip", "-n", f"{t}-{side}", "link", "set", "eth0", "up")
            run("ip", "-n", f"{t}-{side}", "route", "add", f"{a(other)}/30", "via", a(host))
        rig.rr_server(self.cleanup, self.rr, f"{t}-rb")
        self.configs["routed"] = Config("routed", self._ns_client(f"{t}-ra", a(70)))

    # -- iptables ----------------------------------------------------------------------------

    def build_iptables(self, bridge: str) -> None:
        """Our FORWARD chain (jumped to at position 1) and the rule sets the bridge switches between."""
        c, t = self.chain, self.tag
        lines = ["*filter", f":{c}-F - [0:0]", f":{c}-R0 - [0:0]", f":{c}-R1k - [0:0]", f":{c}-R10k - [0:0]",
                 f":{c}-R10kE - [0:0]",
                 f"-A {c}-F -i {t}ra -o {t}rb -j ACCEPT", f"-A {c}-F -i {t}rb -o {t}ra -j ACCEPT",
                 f"-A {c}-F -i {bridge} -o {bridge} -j {c}-R0", f"-A {c}-R0 -j ACCEPT",
                 f"-A {c}-R10kE -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
        for chain, n in ((f"{c}-R1k", 1000), (f"{c}-R10k", 10_000), (f"{c}-R10kE", 10_000)):
            lines += [non_matching_rule(chain, i) for i in range(n)]
            lines.append(f"-A {chain} -j ACCEPT")
        lines.append("COMMIT")
        self.cleanup.push("iptables chains", self._remove_chains)
        started = time.monotonic()
        rig.iptables_restore("\n".join(lines) + "\n")
        log.info("iptables: 21k rules loaded in %.2f s", time.monotonic() - started)
        run("iptables", "-w", "-I", "FORWARD", "1", "-m", "comment", "--comment", f"cgbench:{t}", "-j", f"{c}-F")
        self.bridge = bridge

    def _remove_chains(self) -> None:
        c = self.chain
        jump = ["-m", "comment", "--comment", f"cgbench:{self.tag}", "-j", f"{c}-F"]
        while run("iptables", "-w", "-D", "FORWARD", *jump, check=False).returncode == 0:
            pass
        for chain in ("F", "R0", "R1k", "R10k", "R10kE"):
            run("iptables", "-w", "-F", f"{c}-{chain}", check=False)
        for chain in ("F", "R0", "R1k", "R10k", "R10kE"):
            run("iptables", "-w", "-X", f"{c}-{chain}", check=False)

    def _bridge_rules(self, which: str) -> Callable[[], None]:
        def enter() -> None:
            run("iptables", "-w", "-R", f"{self.chain}-F", "3", "-i", self.bridge, "-o", self.bridge,
                "-j", f"{self.chain}-{which}")
        return enter

    # -- containers --------------------------------------------------------------------------

    def container(self, name: str, cpu: int, network: str | None, labels: dict[str, str], server: bool) -> str:
        args = ["run", "-d", "--name", name, "--cpuset-cpus", str(cpu), "--sysctl", PORT_RANGE]
        if network:
            args += ["--network", network]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        cmd = ["/rr", "-s", "-p", str(rig.RR_PORT), "-C", str(cpu)] if server else ["sleep", "86400"]
        self.dockerd(*args, self.image, *cmd)
        return name

    def agent_network(self, v4: str) -> str:
        """Start the cellgate agent (range v4) on the private dockerd; its network's name."""
        t = self.tag
        self.agent = rig.Agent(self.cleanup, self.workdir, f"{t}a", v4,
                               f"fd63:cb:{self.rng.randrange(1 << 16):x}::/64",
                               docker_host=f"unix://{self.dockerd.sock}")
        self.agent.start()
        self.cleanup.push("containers on the agent's network", self.dockerd.remove_containers)
        net = f"{t}net"
        self.dockerd("network", "create", "-d", self.agent.name, "--ipam-driver", self.agent.name, net)
        return net

    def pair(self, prefix: str, network: str | None, labels: tuple[str, str] | None = None) -> tuple[str, str]:
        """(client container, server address), once the client reaches the server."""
        srv = self.container(f"{prefix}s", self.server_cpu, network,
                             {"app": labels[0]} if labels else {}, server=True)
        cli = self.container(f"{prefix}c", self.client_cpu, network,
                             {"app": labels[1]} if labels else {}, server=False)
        address = self.dockerd.ip(srv)
        wait_until(lambda: self.dockerd("exec", cli, "/rr", "-c", address, "-m", "rr", "-t", "0.05", "-w", "0",
                                        check=False), 30, f"{cli} to reach {srv}", every=0.1)
        return cli, address

    def build_docker(self, v4: str) -> None:
        t = self.tag
        bridge_net = rig.free_subnet("198.18.0.0/15", 24, self.rng)
        bridge = f"{t}br"
        run("ip", "link", "add", bridge, "type", "bridge")
        self.cleanup.push(f"bridge {bridge}", run, "ip", "link", "del", bridge, check=False)
        run("ip", "addr", "add", f"{bridge_net.network_address + 1}/{bridge_net.prefixlen}", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        self.build_iptables(bridge)
        self.dockerd = rig.Dockerd(self.cleanup, t, bridge)
        self.image = self.dockerd.image(self.rr, f"{t}/rr:1")
        cli, address = self.pair(f"{t}b", None)
        client = self._docker_client(cli, address)
        self._nsenter_server(f"{t}bs")
        self.configs["docker_bridge_ns"] = Config("docker_bridge_ns", self._nsenter_client(cli, address),
                                                  self._bridge_rules("R0"))
        for name, rules in (("docker_bridge", "R0"), ("ipt_1k", "R1k"), ("ipt_10k", "R10k"),
                            ("ipt_10k_est", "R10kE")):
            self.configs[name] = Config(name, client, self._bridge_rules(rules))

        net = self.agent_network(v4)
        open_cli, open_addr = self.pair(f"{t}o", net, ("cgb-open-srv", "cgb-open-cli"))
        pol_cli, pol_addr = self.pair(f"{t}p", net, ("cgb-pol-srv", "cgb-pol-cli"))
        self._policy(pol_cli, pol_addr, open_cli)
        pid = self.agent.proc.pid if self.agent.proc else 0
        self.configs["cg_open"] = Config("cg_open", self._docker_client(open_cli, open_addr), self._unfill, pid)
        self.configs["cg_policy"] = Config("cg_policy", self._docker_client(pol_cli, pol_addr), self._unfill, pid)
        self.configs["cg_policy_100k"] = Config("cg_policy_100k", self._docker_client(pol_cli, pol_addr),
                                                self._fill, pid)
        self._nsenter_server(f"{t}ps")
        self.configs["cg_policy_ns"] = Config("cg_policy_ns", self._nsenter_client(pol_cli, pol_addr), self._unfill,
                                              pid)

    def _policy(self, pol_cli: str, pol_addr: str, open_cli: str) -> None:
        """Rules for the cg_policy pair; check they are in force (the open client is refused)."""
        from plugin.client import Client

        api = Client(str(self.agent.api), timeout=60)
        wait_until(lambda: all(any(lbl.endswith(f"app={app}") for e in api.get("/v1/endpoints")
                                   for lbl in e["labels"])
                               for app in ("cgb-pol-srv", "cgb-pol-cli", "cgb-open-srv", "cgb-open-cli")),
                   30, "the agent to learn the containers' labels", every=0.05)
        port = [{"ports": [{"port": str(p), "protocol": "TCP"} for p in (rig.RR_PORT, NS_PORT)]}]
        rules = [
            {"labels": [{"key": "name", "value": "cgb-pol-srv"}],
             "endpointSelector": {"matchLabels": {"app": "cgb-pol-srv"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "cgb-pol-cli"}}], "toPorts": port}]},
            {"labels": [{"key": "name", "value": "cgb-pol-cli"}],
             "endpointSelector": {"matchLabels": {"app": "cgb-pol-cli"}},
             "egress": [{"toEndpoints": [{"matchLabels": {"app": "cgb-pol-srv"}}], "toPorts": port}]},
        ]
        revision = api.post("/v1/policy", {"rules": rules})["revision"]
        api.get(f"/v1/policy/wait?revision={revision}&timeout=30")
        refused = self.dockerd("exec", open_cli, "timeout", "2", "/rr", "-c", pol_addr, "-m", "rr", "-t", "0.05",
                               "-w", "0", check=False)
        if refused:
            raise RuntimeError("policy is not enforced: a client without a rule reached the policy server")
        self.dockerd("exec", pol_cli, "/rr", "-c", pol_addr, "-m", "rr", "-t", "0.05", "-w", "0")
        from datapath.kernel.loader import Datapath

        self.view = Datapath(self.agent.bpf)  # the agent's pinned maps, for the fillers
        self.cleanup.push("map handles", self.view.close)
        self.fillers = filler_arrays()

    def _fill(self) -> None:
        if not self.filled:
            keys, values, ikeys, ivalues = self.fillers
            batch(self.view.policy.items_update_batch, keys, values)
            batch(self.view.ipcache.items_update_batch, ikeys, ivalues)
            self.filled = True

    def _unfill(self) -> None:
        if self.filled:
            keys, _, ikeys, _ = self.fillers
            batch(self.view.policy.items_delete_batch, keys)
            batch(self.view.ipcache.items_delete_batch, ikeys)
            self.filled = False


def non_matching_rule(chain: str, i: int) -> str:
    """A rule no benchmark packet matches: sources in 198.19.0.0/16, which nothing sends from."""
    return f"-A {chain} -s 198.19.{i // 256 % 256}.{i % 256}/32 -p tcp -m tcp --dport {1 + i % 65000} -j DROP"


def filler_arrays() -> tuple[Any, Any, Any, Any]:
    from datapath.kernel import layout

    keys, values = (layout.CgPolicyKey * FILLER_POLICY)(), (layout.CgPolicyValue * FILLER_POLICY)()
    for i in range(FILLER_POLICY):
        k = keys[i]
        k.prefixlen, k.subject, k.peer = 96, 0x00F00000 + i // FILLER_IDENTITIES, 0x00E00000 + i % FILLER_IDENTITIES
        k.egress, k.proto, k.dport = i & 1, 6, socket.htons(1 + i % 65000)
        values[i].rule = 1
    ikeys, ivalues = (layout.CgIpcacheKey * FILLER_IDENTITIES)(), (layout.CgIpcacheValue * FILLER_IDENTITIES)()
    for i in range(FILLER_IDENTITIES):
        ikeys[i].prefixlen, ikeys[i].family = 64, 4
        ctypes.memmove(ikeys[i].addr, bytes([198, 19, i // 256, i % 256]), 4)
        ivalues[i].identity = 0x00E00000 + i
    return keys, values, ikeys, ivalues


def batch(op: Callable[..., Any], keys: Any, values: Any = None, chunk: int = 4096) -> None:
    ktype = type(keys)._type_
    vtype = type(values)._type_ if values is not None else None
    for start in range(0, len(keys), chunk):
        n = min(chunk, len(keys) - start)
        k = (ktype * n).from_buffer(keys, start * ctypes.sizeof(ktype))
        if vtype is None:
            op(k)
        else:
            op(k, (vtype * n).from_buffer(values, start * ctypes.sizeof(vtype)))


def run_datapath(rounds: int, seconds: float, stream_seconds: float, warmup: float, seed: int,
                 chunk: int = 0, configs: tuple[str, ...] = CONFIGS) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = new_tag()
    samples: list[dict[str, Any]] = []
    out: dict[str, Any] = {"tier": "datapath", "machine": machine(), "started": time.time(), "chunk": chunk,
                           "seed": seed, "tag": tag, "samples": samples,
                           "settings": {"rounds": rounds, "seconds": seconds, "stream_seconds": stream_seconds,
                                        "warmup": warmup, "configs": list(configs)}}
    with Cleanup() as cleanup:
        r = Rig(cleanup, tag, rng)
        with timed("datapath rig"):
            r.build_netns()
            v4 = rig.free_subnet("10.64.0.0/10", 20, rng)
            r.build_docker(str(v4))
        for rnd in range(rounds):
            order = list(configs)
            rng.shuffle(order)
            log.info("round %d/%d: %s", rnd + 1, rounds, " ".join(order))
            for name in order:
                cfg = r.configs[name]
                cfg.enter()
                for mode in MODES:
                    secs = stream_seconds if mode == "stream" else seconds
                    cpu0 = cpu_seconds(cfg.agent_pid) if cfg.agent_pid else 0.0
                    result = cfg.client(mode, secs, warmup)
                    sample = {"round": rnd, "chunk": chunk, "config": name, "mode": mode, **result}
                    if cfg.agent_pid:
                        sample["agent_cpu_s"] = cpu_seconds(cfg.agent_pid) - cpu0
                    samples.append(sample)
                log.info("  %-15s rr %8.0f/s  crr %7.0f/s  stream %6.2f Gbit/s", name,
                         samples[-3].get("tps", 0), samples[-2].get("tps", 0), samples[-1].get("gbit_s", 0))
        r._unfill()
        out["agent_status"] = r.agent.client().get("/v1/status")
    out["seconds"] = time.time() - out["started"]
    return out
