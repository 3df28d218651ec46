"""Building blocks of the benchmark rigs: netns, veths, the rr tool, a private dockerd, an agent.

Every object is named from the run's tag (`cgb…`), registered on the run's Cleanup right
after it exists, and removed by name or PID; nothing that this run did not create is
ever touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Cleanup, run, wait_until

CELLGATE = str(Path(sys.executable).with_name("cellgate"))
CNI_BIN = str(Path(sys.executable).with_name("cellgate-cni"))
RR_SRC = ROOT / "bench" / "rr.c"
RR_PORT = 5201
SERVER_CPU, CLIENT_CPU = 1, 0


# -- the rr tool -----------------------------------------------------------------------------


def build_rr(workdir: Path) -> Path:
    """Compile bench/rr.c statically (so it runs in busybox containers too)."""
    out = workdir / "rr"
    run("gcc", "-O2", "-static", "-Wall", "-o", str(out), str(RR_SRC), timeout=120)
    return out


def parse_rr(stdout: str) -> dict[str, Any]:
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        return json.loads(line)
    except ValueError:
        raise RuntimeError(f"rr printed no result: {stdout[-300:]!r}") from None


def cpus() -> tuple[int, int]:
    """(server CPU, client CPU): different CPUs when the machine has two or more."""
    n = os.cpu_count() or 1
    return (SERVER_CPU, CLIENT_CPU) if n >= 2 else (0, 0)


# -- addresses -------------------------------------------------------------------------------


def host_routes() -> list[ipaddress.IPv4Network]:
    out = []
    for line in run("ip", "-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "throw"):
            word = line.split()[1]
        if word and word[0].isdigit():
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(word, strict=False))
    for line in run("ip", "-4", "-o", "addr").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
    return out


def free_subnet(space: str, prefix: int, rng: random.Random) -> ipaddress.IPv4Network:
    """A subnet of `space` that no route or address of this host touches."""
    taken = host_routes()
    candidates = list(ipaddress.ip_network(space).subnets(new_prefix=prefix))
    rng.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net  # type: ignore[return-value]
    raise RuntimeError(f"no free /{prefix} left in {space}")


# -- network namespaces and links ------------------------------------------------------------


def netns(cleanup: Cleanup, name: str) -> str:
    run("ip", "netns", "add", name)
    cleanup.push(f"netns {name}", run, "ip", "netns", "del", name, check=False)
    run("ip", "-n", name, "link", "set", "lo", "up")
    return name


def veth(cleanup: Cleanup, name: str, peer: str, peer_ns: str | None = None, ns: str | None = None) -> None:
    """A veth pair; `name` stays in `ns` (root when None), `peer` goes to `peer_ns`."""
    cmd = ["ip"] + (["-n", ns] if ns else []) + ["link", "add", name, "type", "veth", "peer", "name", peer]
    if peer_ns:
        cmd += ["netns", peer_ns]
    run(*cmd)
    if ns is None:
        cleanup.push(f"link {name}", run, "ip", "link", "del", name, check=False)


def ns_run(ns: str, *cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=check)


class Process:
    """A process we started, stopped by its own PID only."""

    def __init__(self, cleanup: Cleanup, cmd: list[str], what: str, log_path: Path | None = None) -> None:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        self._out = out
        self.what = what
        cleanup.push(what, self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            with contextlib.suppress(Exception):
                self._out.close()  # type: ignore[union-attr]


def rr_server(cleanup: Cleanup, rr: Path, ns: str, port: int = RR_PORT) -> Process:
    server_cpu, _ = cpus()
    proc = Process(cleanup, ["ip", "netns", "exec", ns, str(rr), "-s", "-p", str(port), "-C", str(server_cpu)],
                   f"rr server in {ns}")
    wait_until(lambda: f":{port:X} " in " ".join(
        ns_run(ns, "cat", "/proc/net/tcp6").stdout.split("\n")), 10, f"rr server in {ns}")
    return proc


# -- iptables --------------------------------------------------------------------------------


def iptables_restore(rules: str) -> None:
    run("iptables-restore", "-w", "--noflush", input=rules, timeout=300)


# -- private dockerd -------------------------------------------------------------------------


class Dockerd:
    """A private dockerd (own data root, exec root, socket, and bridge), stopped by its PID."""

    def __init__(self, cleanup: Cleanup, tag: str, bridge: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{tag}d", dir="/tmp"))
        self.sock = self.root / "docker.sock"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}")
        self.tag = tag
        cleanup.push(f"dockerd root {self.root}", self._remove_root)
        cmd = ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
               "-H", f"unix://{self.sock}", "-p", str(self.root / "docker.pid"), "--iptables=false",
               "--ip-masq=false", f"--bridge={bridge}"]
        self.proc = Process(cleanup, cmd, f"dockerd {self.root}", self.root / "dockerd.log")
        cleanup.push("containers", self.remove_containers)
        wait_until(lambda: self.attempt("info").returncode == 0, 60, "dockerd")

    def _remove_root(self) -> None:
        for sub in ("data", "exec"):
            run("umount", "-R", str(self.root / sub), check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def remove_containers(self) -> None:
        ids = self("ps", "-aq", "--filter", f"name={self.tag}", check=False).split()
        if ids:
            self("rm", "-f", *ids, check=False)
        for net in self("network", "ls", "-q", "--filter", f"name={self.tag}", check=False).split():
            self("network", "rm", net, check=False)

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return run("docker", *args, check=check, env=self.env, timeout=timeout).stdout.strip()

    def attempt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run("docker", *args, check=False, env=self.env)

    def image(self, rr: Path, name: str) -> str:
        """busybox + rr, imported from a tar stream (no registry)."""
        root = Path(tempfile.mkdtemp(prefix=f"{self.tag}img", dir="/tmp"))
        try:
            for sub in ("bin", "tmp", "etc"):
                (root / sub).mkdir()
            shutil.copy("/bin/busybox", root / "bin" / "busybox")
            for applet in run("/bin/busybox", "--list").stdout.split():
                if applet != "busybox":
                    (root / "bin" / applet).symlink_to("busybox")
            shutil.copy(rr, root / "rr")
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", name], stdin=tar.stdout,
                           env=self.env, check=True, capture_output=True, timeout=120)
            tar.wait()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return name

    def inspect(self, what: str) -> Any:
        return json.loads(self("inspect", what))[0]

    def ip(self, container: str) -> str:
        nets = self.inspect(container)["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])


# -- an isolated cellgate agent --------------------------------------------------------------


class Agent:
    """A cellgate agent subprocess with its own instance name, sockets, state, pins and chains."""

    def __init__(self, cleanup: Cleanup, workdir: Path, name: str, v4: str, v6: str, docker_host: str = "",
                 extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.base = workdir / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.api = self.base / "api.sock"
        self.state = self.base / "state"
        self.bpf = Path("/sys/fs/bpf") / name
        self.log = self.base / "agent.log"
        self.args = ["--name", name, "--socket", str(self.api), "--state-dir", str(self.state),
                     "--bpf-dir", str(self.bpf), "--ipv4-range", v4, "--ipv6-range", v6,
                     "--docker-host", docker_host or "unix:///nonexistent/cgbench.sock", "--cni-bin-dir", "",
                     *extra]
        self.proc: Process | None = None
        self._cleanup = cleanup
        cleanup.push(f"agent {name} state", self._final_cleanup)

    def start(self, timeout: float = 60) -> float:
        """Start and wait for the API; returns seconds from spawn to the first answer."""
        started = time.monotonic()
        self.proc = Process(self._cleanup, [CELLGATE, "agent", *self.args], f"agent {self.name}", self.log)
        wait_until(self._ready, timeout, f"agent {self.name}", every=0.005)
        return time.monotonic() - started

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.proc.poll() is not None:
            raise RuntimeError(f"agent {self.name} exited:\n{self.log.read_text()[-2000:]}")
        from plugin.client import ApiError, Client

        try:
            Client(str(self.api), timeout=5).get("/v1/healthz")
        except ApiError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def client(self) -> Any:
        from plugin.client import Client

        return Client(str(self.api), timeout=120)

    def rss_kib(self) -> dict[str, int]:
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def _final_cleanup(self) -> None:
        self.stop()
        run(CELLGATE, "cleanup", *self.args, check=False, timeout=300)
