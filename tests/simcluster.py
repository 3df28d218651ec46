"""A cellgate cluster on one machine: N node namespaces on a bridged underlay, one etcd, one agent per
node, endpoints made through the real CNI plugin. Used by `make cluster`, `make demo-cluster` and the
cluster tests (docs/cluster.md).

    python -m tests.simcluster up [--nodes 5] [--tunnel vxlan|disabled] [--docker]
    python -m tests.simcluster status | down

Everything made is named cg<tag>…; `down` removes it, found again from the JSON description
(/run/cellgate-cluster/<tag>.json; `make cluster` uses the tag "cl" and links it as cluster.json).
No traffic leaves the namespaces made here: node namespaces have no default route, and etcd
listens only on the underlay bridge inside the underlay namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.kernel.helpers import wait_until  # re-exported: the cluster tests wait with it too

ROOT = Path(__file__).resolve().parent.parent
CELLGATE = str(ROOT / ".venv" / "bin" / "cellgate")
CNI = str(ROOT / ".venv" / "bin" / "cellgate-cni")
RUN_DIR = Path("/run/cellgate-cluster")
UNDERLAY = ipaddress.IPv4Network("10.254.77.0/24")  # checked against the host's routes at `up`


def sh(*cmd: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=stdin, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out


@dataclass
class SimNode:
    index: int
    name: str  # node name = agent instance name
    netns: str  # "" for the host node
    address: str
    ipv4_range: str
    ipv6_range: str
    base: str
    api_socket: str
    pid: int = 0
    # A bpffs the cluster mounts in the host's namespace: `ip netns exec` remounts /sys, so pins under
    # /sys/fs/bpf would live in each process's own mount namespace, lost to restarts and `cleanup`
    # (and the cgroup socket programs they hold would stay attached with nobody to detach them).
    bpf_root: str = "/sys/fs/bpf"

    @property
    def state_dir(self) -> str:
        return f"{self.base}/state"

    @property
    def bpf_dir(self) -> str:
        return f"{self.bpf_root}/{self.name}"


@dataclass
class SimEndpoint:
    name: str
    node: str
    netns: str
    cid: str
    ipv4: str
    ipv6: str
    labels: dict[str, str] = field(default_factory=dict)


class Cluster:
    def __init__(self, nodes: int = 5, tunnel: str = "vxlan", lease_ttl: int = 10, docker_node: bool = False,
                 tag: str = "", workdir: Path | None = None, docker_host: str = "", image: str = "") -> None:
        self.tag = tag or secrets.token_hex(2)
        self.count = nodes
        self.tunnel = tunnel
        self.lease_ttl = lease_ttl
        self.docker_node = docker_node
        self.docker_host = docker_host  # "" = the docker CLI's default
        self.image = image or self.IMAGE
        self.workdir = Path(workdir or f"/tmp/cg{self.tag}-cluster")
        self.ul = f"cg{self.tag}ul"
        self.bridge = f"cg{self.tag}br"
        self.nodes: list[SimNode] = []
        self.endpoints: list[SimEndpoint] = []
        self.etcd_url = ""
        self.etcd_pid = 0
        self._etcd: Any = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- description -------------------------------------------------------------------------

    @property
    def description_path(self) -> Path:
        return RUN_DIR / f"{self.tag}.json"

    def describe(self) -> dict[str, Any]:
        return {"tag": self.tag, "tunnel": self.tunnel, "underlay": {"netns": self.ul, "bridge": self.bridge,
                                                                    "network": str(UNDERLAY)},
                "etcd": {"url": self.etcd_url, "pid": self.etcd_pid, "netns": self.ul},
                "workdir": str(self.workdir),
                "nodes": [asdict(n) | {"state_dir": n.state_dir, "bpf_dir": n.bpf_dir} for n in self.nodes],
                "endpoints": [asdict(e) for e in self.endpoints]}

    def write(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.description_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        os.replace(tmp, self.description_path)

    # -- up / down ---------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        routes = sh("ip", "-4", "route", "show").stdout
        for line in routes.splitlines():
            words = line.split()
            dst = words[1] if words[0] in ("blackhole", "unreachable", "prohibit", "local", "broadcast") else words[0]
            if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(UNDERLAY):
                raise RuntimeError(f"the underlay {UNDERLAY} overlaps the host route {line!r}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._mount_bpffs()
            self._underlay()
            self._start_etcd()
            for i in range(1, self.count + 1):
                self._node(i)
            if self.docker_node:
                self._node(0, host=True)
            for node in self.nodes:
                self.start_agent(node)
            wait_until(lambda: all(len(self.cli(n, "node", "list")) == len(self.nodes) for n in self.nodes),
                       30, "every node to see every other")
            if self.docker_node:
                self._docker_join()
        except BaseException:
            self.write()
            self.down()
            raise
        self.write()

    @property
    def bpf_root(self) -> Path:
        return RUN_DIR / f"{self.tag}-bpf"

    def _mount_bpffs(self) -> None:
        self.bpf_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.path.ismount(self.bpf_root):
            sh("mount", "-t", "bpf", "bpf", str(self.bpf_root))

    def _underlay(self) -> None:
        sh("ip", "netns", "add", self.ul)
        sh("ip", "-n", self.ul, "link", "set", "lo", "up")
        sh("ip", "-n", self.ul, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", self.ul, "addr", "add", f"{UNDERLAY[254]}/24", "dev", self.bridge)
        sh("ip", "-n", self.ul, "link", "set", self.bridge, "up")

    def _start_etcd(self) -> None:
        from tests.etcd_server import EtcdServer

        self._etcd = EtcdServer(self.workdir / "etcd", host=str(UNDERLAY[254]), port=2379, netns=self.ul)
        self._etcd.peer_port = 2380
        self._etcd.start()
        self.etcd_url, self.etcd_pid = self._etcd.url, self._etcd.pid

    def _node(self, i: int, host: bool = False) -> None:
        name = f"cg{self.tag}n{i}"
        ns = "" if host else name
        outer, inner = f"cg{self.tag}u{i}", f"cg{self.tag}v{i}"
        address = str(UNDERLAY[100 if host else i])
        if not host:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.ul)
            sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        else:
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", self.ul)
            sh("ip", "addr", "add", f"{address}/24", "dev", inner)
            sh("ip", "link", "set", inner, "up")
        sh("ip", "-n", self.ul, "link", "set", outer, "master", self.bridge)
        sh("ip", "-n", self.ul, "link", "set", outer, "up")
        slot = 200 + i  # ranges 10.192.0.0/10 slot: clear of the machine-id default of a host agent
        v4 = f"10.{192 + slot // 16}.{(slot % 16) * 16}.0/20"
        v6 = f"fd63:6767:0:{slot:x}::/64"
        base = self.workdir / name
        base.mkdir(parents=True, exist_ok=True)
        self.nodes.append(SimNode(i, name, ns, address, v4, v6, str(base), str(base / "api.sock"),
                                  bpf_root=str(self.bpf_root)))

    # -- the host's Docker as a node ------------------------------------------------------------

    IMAGE = "cellgate-cluster/busybox:latest"

    @property
    def docker_net(self) -> str:
        return f"cg{self.tag}dnet"

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DOCKER_HOST=self.docker_host) if self.docker_host else None
        return sh("docker", *args, check=check, env=env)

    def _docker_join(self) -> None:
        if self.docker("info", check=False).returncode != 0:
            raise RuntimeError("the host node needs a running dockerd (`make cluster` starts one)")
        if self.docker("image", "inspect", self.image, check=False).returncode != 0:
            root = self.workdir / "rootfs"
            (root / "bin").mkdir(parents=True, exist_ok=True)
            shutil.copy("/bin/busybox", root / "bin" / "busybox")
            for applet in sh("/bin/busybox", "--list").stdout.split():
                if applet != "busybox":
                    with contextlib.suppress(FileExistsError):
                        (root / "bin" / applet).symlink_to("busybox")
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            env = dict(os.environ, DOCKER_HOST=self.docker_host) if self.docker_host else None
            subprocess.run(["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", self.image], stdin=tar.stdout,
                           capture_output=True, check=True, env=env)
            tar.wait()
        host = next(n for n in self.nodes if not n.netns)
        self.docker("network", "create", "-d", host.name, "--ipam-driver", host.name, self.docker_net)
        self.docker("run", "-d", "--name", f"cg{self.tag}d1", "--net", self.docker_net, "-l", "app=docker",
                    self.image, "sleep", "86400")

    def docker_container_ip(self) -> str:
        return self.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                  f"cg{self.tag}d1").stdout.strip()

    def agent_args(self, node: SimNode) -> list[str]:
        args = ["--name", node.name, "--socket", node.api_socket, "--state-dir", node.state_dir,
                "--bpf-dir", node.bpf_dir, "--plugin-socket", f"{node.base}/plugin.sock",
                "--ipv4-range", node.ipv4_range, "--ipv6-range", node.ipv6_range, "--masquerade", "false",
                "--kvstore", "etcd", "--kvstore-endpoints", self.etcd_url, "--node-name", node.name,
                "--node-address", node.address, "--tunnel", self.tunnel, "--lease-ttl", str(self.lease_ttl),
                "--cni-bin-dir", ""]
        if node.netns:
            args += ["--docker-host", "unix:///nonexistent"]
        else:
            args[args.index("--plugin-socket") + 1] = f"/run/docker/plugins/{node.name}.sock"
            if self.docker_host:
                args += ["--docker-host", self.docker_host]
        return args

    def start_agent(self, node: SimNode, extra: tuple[str, ...] = (), wait: bool = True,
                    kvstore: bool = True) -> None:
        """Start the node's agent; `kvstore=False` starts it as a single host (no cluster flags)."""
        args = self.agent_args(node)
        if not kvstore:
            for flag in ("--kvstore", "--kvstore-endpoints", "--node-name", "--node-address", "--tunnel",
                         "--lease-ttl"):
                i = args.index(flag)
                del args[i:i + 2]
        cmd = [CELLGATE, "agent", *args, *extra]
        if node.netns:
            cmd = ["ip", "netns", "exec", node.netns, *cmd]
        log = open(Path(node.base) / "agent.log", "ab")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._procs[node.name] = proc
        node.pid = proc.pid
        if wait:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent {node.name} exited with {proc.returncode}:\n"
                                       f"{(Path(node.base) / 'agent.log').read_text()[-3000:]}")
                return self.cli(node, "status", check=False) is not None
            wait_until(ready, 60, f"agent {node.name}")
        self.write()

    def agent_exit(self, node: SimNode, timeout: float = 30) -> int:
        return self._procs[node.name].wait(timeout)

    def kill_agent(self, node: SimNode, sig: int = signal.SIGKILL) -> None:
        proc = self._procs.pop(node.name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        proc.wait(30)
        node.pid = 0

    def down(self) -> None:
        for ep in list(self.endpoints):
            with contextlib.suppress(Exception):
                self.remove_endpoint(ep)
        if any(not n.netns for n in self.nodes):
            self.docker("rm", "-f", f"cg{self.tag}d1", check=False)
            self.docker("network", "rm", self.docker_net, check=False)
        for node in self.nodes:
            self.kill_agent(node, signal.SIGTERM)
            if node.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGTERM)
            with contextlib.suppress(Exception):
                pre = ["ip", "netns", "exec", node.netns] if node.netns else []
                sh(*pre, CELLGATE, "cleanup", *self.agent_args(node)[:14], check=False, timeout=60)
            if node.netns:
                sh("ip", "netns", "del", node.netns, check=False)
            else:
                sh("ip", "link", "del", f"cg{self.tag}v{node.index}", check=False)
        if self._etcd is not None:
            self._etcd.stop()
        elif self.etcd_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.etcd_pid, signal.SIGTERM)
        sh("ip", "netns", "del", self.ul, check=False)
        if os.path.ismount(self.bpf_root):
            sh("umount", str(self.bpf_root), check=False)
        with contextlib.suppress(OSError):
            self.bpf_root.rmdir()
        for ep in self.endpoints:
            sh("ip", "netns", "del", ep.netns, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.description_path.unlink()

    @classmethod
    def load(cls, tag: str) -> Cluster:
        doc = json.loads((RUN_DIR / f"{tag}.json").read_text())
        c = cls(len(doc["nodes"]), doc["tunnel"], tag=tag, workdir=Path(doc["workdir"]))
        c.nodes = [SimNode(**{k: v for k, v in n.items() if k in SimNode.__dataclass_fields__}) for n in doc["nodes"]]
        c.endpoints = [SimEndpoint(**e) for e in doc["endpoints"]]
        c.etcd_url, c.etcd_pid = doc["etcd"]["url"], doc["etcd"]["pid"]
        return c

    # -- using it ----------------------------------------------------------------------------

    def node(self, i: int) -> SimNode:
        return next(n for n in self.nodes if n.index == i)

    def cli(self, node: SimNode, *args: str, check: bool = True) -> Any:
        out = sh(CELLGATE, *args, "--socket", node.api_socket, "-o", "json", check=False, timeout=30)
        if out.returncode != 0:
            if check:
                raise RuntimeError(f"cellgate {' '.join(args)} on {node.name}: {out.stderr.strip()}")
            return None
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def endpoint(self, node: SimNode, name: str, labels: dict[str, str], ipv6: bool = True) -> SimEndpoint:
        ns = f"cg{self.tag}e{name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        cid = f"cg{self.tag}-{name}"
        conf = {"cniVersion": "1.0.0", "name": f"cg{self.tag}net", "type": "cellgate-cni",
                "socket": node.api_socket, "ipv6": ipv6}
        env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{ns}",
                   CNI_IFNAME="eth0", CNI_PATH=str(Path(CNI).parent),
                   CNI_ARGS="IgnoreUnknown=1;CELLGATE_LABELS=" + ",".join(f"{k}:{v}" for k, v in labels.items()))
        out = sh(CNI, env=env, stdin=json.dumps(conf), check=False)
        if out.returncode != 0:
            sh("ip", "netns", "del", ns, check=False)
            raise RuntimeError(f"CNI ADD on {node.name}: {out.stdout.strip()} {out.stderr.strip()}")
        result = json.loads(out.stdout)
        v4 = next((ip["address"].split("/")[0] for ip in result["ips"] if ":" not in ip["address"]), "")
        v6 = next((ip["address"].split("/")[0] for ip in result["ips"] if ":" in ip["address"]), "")
        ep = SimEndpoint(name, node.name, ns, cid, v4, v6, dict(labels))
        self.endpoints.append(ep)
        self.write()
        return ep

    def remove_endpoint(self, ep: SimEndpoint) -> None:
        node = next(n for n in self.nodes if n.name == ep.node)
        conf = {"cniVersion": "1.0.0", "name": f"cg{self.tag}net", "type": "cellgate-cni",
                "socket": node.api_socket}
        env = dict(os.environ, CNI_COMMAND="DEL", CNI_CONTAINERID=ep.cid, CNI_NETNS=f"/run/netns/{ep.netns}",
                   CNI_IFNAME="eth0", CNI_PATH=str(Path(CNI).parent))
        sh(CNI, env=env, stdin=json.dumps(conf), check=False)
        sh("ip", "netns", "del", ep.netns, check=False)
        self.endpoints.remove(ep)
        self.write()

    def run(self, ep: SimEndpoint, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ep.netns, *cmd, check=False, timeout=timeout)

    def ping(self, ep: SimEndpoint, address: str) -> bool:
        return self.run(ep, "ping", "-c", "1", "-W", "1", address).returncode == 0

    def ipcache(self, node: SimNode) -> dict[str, dict[str, Any]]:
        return {e["prefix"]: e for e in self.cli(node, "bpf", "ipcache", "list")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.simcluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--tunnel", choices=("vxlan", "disabled"), default="vxlan")
    p.add_argument("--docker", action="store_true", help="the host joins as one more node (its Docker)")
    p.add_argument("--tag", default="cl")
    p.add_argument("--lease-ttl", type=int, default=10)
    args = p.parse_args(argv)
    if args.command == "up":
        if (RUN_DIR / f"{args.tag}.json").exists():
            print(f"cluster {args.tag} is up already ({RUN_DIR / f'{args.tag}.json'}); `make cluster-down` first")
            return 1
        c = Cluster(args.nodes, args.tunnel, args.lease_ttl, args.docker, tag=args.tag)
        c.up()
        for n in c.nodes:
            print(f"{n.name}: netns {n.netns or '(host)'}, address {n.address}, {n.ipv4_range} {n.ipv6_range}, "
                  f"cellgate --socket {n.api_socket}")
        link = RUN_DIR / "cluster.json"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(c.description_path.name)
        print(f"description: {link}")
        return 0
    if not (RUN_DIR / f"{args.tag}.json").exists():
        print(f"no cluster {args.tag}")
        return 0 if args.command == "down" else 1
    c = Cluster.load(args.tag)
    if args.command == "status":
        print(json.dumps(c.describe(), indent=2))
        return 0
    c.down()
    with contextlib.suppress(FileNotFoundError):
        (RUN_DIR / "cluster.json").unlink()
    print(f"cluster {args.tag} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
