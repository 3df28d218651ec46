"""Helpers for the e2e tier: a private dockerd, an isolated agent subprocess, a test scene.

Everything is real: dockerd from Debian's docker.io, the agent as a subprocess with its
own instance name (so its own sockets, state, pins, links and iptables chains), and
containers on its networks. Teardown removes exactly what was made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CELLGATE = str(Path(sys.executable).with_name("cellgate"))


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition", every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def run(*cmd: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout, input=input,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Dockerd:
    """A private dockerd: own data root, exec root and socket; stopped by its own PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "dockerd.log"

    def start(self, *extra: str) -> None:
        self.extra = extra
        cmd = ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
               "-H", f"unix://{self.sock}", "-p", str(self.root / "docker.pid"),
               "--iptables=false", "--bridge=none", *extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_until(lambda: run("docker", "info", check=False, env=self.env).returncode == 0, 60, "dockerd")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start(*self.extra)

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return run("docker", *args, check=check, env=self.env, timeout=timeout).stdout.strip()

    def attempt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run("docker", *args, check=False, env=self.env)

    def inspect(self, what: str) -> Any:
        return json.loads(self("inspect", what))[0]


class Agent:
    """A cellgate agent subprocess with its own instance name and paths."""

    def __init__(self, base: Path, name: str, v4: str, v6: str, docker_host: str = "") -> None:
        self.name = name
        self.base = base
        self.api = base / "api.sock"
        self.state = base / "state"
        self.bpf = Path("/sys/fs/bpf") / name
        self.plugin = Path("/run/docker/plugins") / f"{name}.sock"
        self.log = base / "agent.log"
        self.args = ["--name", name, "--socket", str(self.api), "--state-dir", str(self.state),
                     "--bpf-dir", str(self.bpf), "--ipv4-range", v4, "--ipv6-range", v6, "--sweep-interval", "2"]
        if docker_host:
            self.args += ["--docker-host", docker_host]
        self.v4, self.v6 = v4, v6
        self.proc: subprocess.Popen[bytes] | None = None
        self.state_mount: StateMount | None = None  # the state dir on a tmpfs of its own (docker_agent)

    def start(self, failpoints: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if k != "CELLGATE_FAILPOINTS"}
        if failpoints:
            env["CELLGATE_FAILPOINTS"] = failpoints
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([CELLGATE, "agent", *self.args], stdout=log, stderr=log, env=env)
        wait_until(self._ready, 30, f"agent {self.name} to serve its API")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        from plugin.client import Client  # the CLI's own client, without starting a CLI process per try

        return bool(Client(str(self.api), timeout=5).get("/v1/status"))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def exited(self, timeout: float = 60) -> int:
        """Wait for the agent to end by itself (an armed failpoint); its exit status."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGTERM)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(CELLGATE, *args, "--socket", str(self.api), check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def cleanup(self) -> dict[str, Any]:
        out = run(CELLGATE, "cleanup", *self.args, "-o", "json")
        return json.loads(out.stdout)

    def endpoints(self) -> list[dict[str, Any]]:
        return self.json("endpoint", "list")

    def allocations(self) -> list[tuple[str, str, str]]:
        """(address, kind, owner) of every allocation."""
        data = self.json("ipam", "list")
        return [(a["address"], a["kind"], a["owner"]) for p in data["pools"] for a in p["allocations"]]

    def links(self) -> list[str]:
        """Names of the links this instance owns (alias tag cellgate:<name>:)."""
        out = run("ip", "-o", "-d", "link").stdout
        return sorted(line.split(": ")[1].split("@")[0] for line in out.splitlines()
                      if f"alias cellgate:{self.name}:" in line)


def unique_ranges() -> tuple[str, str, int]:
    """A /20 and a /64 that no route on this host touches yet."""
    import ipaddress

    taken = [ipaddress.ip_network(line.split()[0], strict=False)
             for line in run("ip", "-o", "route").stdout.splitlines()
             if line.split() and line.split()[0][0].isdigit()]
    while True:
        n = secrets.randbelow(150) + 100
        v4 = ipaddress.ip_network(f"10.{n}.0.0/20")
        if not any(v4.overlaps(t) for t in taken):
            return str(v4), f"fd63:77:{n:x}::/64", n


class Scene:
    """Networks and containers of one test, named uniquely and removed afterwards."""

    def __init__(self, dockerd: Dockerd, agent: Agent, image: str) -> None:
        self.d, self.agent, self.image = dockerd, agent, image
        self.tag = secrets.token_hex(3)
        self.containers: list[str] = []
        self.networks: list[str] = []

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def network(self, *opts: str, name: str = "") -> str:
        name = name or f"cgn{self.tag}{len(self.networks)}"
        self.d("network", "create", "-d", self.agent.name, "--ipam-driver", self.agent.name, *opts, name)
        self.networks.append(name)
        return name

    def run(self, net: str, *opts: str, cmd: tuple[str, ...] = ("sleep", "3600"), name: str = "") -> str:
        name = name or f"cgc{self.tag}{len(self.containers)}"
        self.containers.append(name)
        self.d("run", "-d", "--name", name, "--label", f"cgtest={self.agent.name}", "--network", net, *opts,
               self.image, *cmd)
        return name

    def ip(self, container: str, net: str, v6: bool = False) -> str:
        info = self.d.inspect(container)["NetworkSettings"]["Networks"][net]
        return info["GlobalIPv6Address" if v6 else "IPAddress"]

    def exec(self, container: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("docker", "exec", container, *cmd, check=check, env=self.d.env)

    def server(self, net: str, port: int = 8080, name: str = "") -> str:
        """A container that answers every TCP connection on `port` with its hostname."""
        script = f'while true; do echo "hello from $(hostname)" | nc -l -p {port}; done'
        return self.run(net, cmd=("sh", "-c", script), name=name)

    def tcp(self, client: str, address: str, port: int = 8080) -> str:
        return wait_until(lambda: self.exec(client, "nc", "-w", "2", address, str(port), check=False).stdout,
                          10, f"TCP answer from {address}:{port}")

    def close(self) -> None:
        if self.containers:
            self.d.attempt("rm", "-f", *self.containers)
        for net in reversed(self.networks):
            self.d.attempt("network", "rm", net)


class StateMount:
    """A state directory on a small tmpfs of its own, which a test fills (disk full), frees, and makes
    read-only (a bind mount of it, remounted ro) and writable again. Unmounted by close()."""

    def __init__(self, path: Path, size: str = "1m") -> None:
        self.path, self.size = path, size
        self.filler = path / "cgfill"
        self.read_only_now = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "cgstate", str(self.path))

    def fill(self) -> None:
        """Write until the file system has no page left."""
        chunk = b"\0" * 65536
        with open(self.filler, "ab") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        probe = self.path / "cgprobe"
        try:
            probe.write_bytes(b"x")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError(f"{self.path} still takes writes after filling it")

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        (self.path / "cgprobe").unlink(missing_ok=True)

    def read_only(self) -> None:
        run("mount", "--bind", str(self.path), str(self.path))
        self.read_only_now = True
        run("mount", "-o", "remount,bind,ro", str(self.path))

    def writable(self) -> None:
        if self.read_only_now:
            run("umount", str(self.path))  # the read-only bind mount on top; the tmpfs below stays
            self.read_only_now = False

    def close(self) -> None:
        self.writable()
        run("umount", str(self.path), check=False)


@contextlib.contextmanager
def docker_agent(dockerd: Dockerd, factory: Any, prefix: str = "cgt",
                 extra: tuple[str, ...] = (), state_size: str = "") -> Iterator[Agent]:
    """An agent following `dockerd`; at the end its containers, networks and everything it made go.
    With `state_size`, its state dir is a tmpfs of that size (`agent.state_mount`)."""
    name = prefix + secrets.token_hex(3)
    v4, v6, _ = unique_ranges()
    a = Agent(factory.mktemp(name), name, v4, v6, docker_host=f"unix://{dockerd.sock}")
    a.args += list(extra)
    if state_size:
        a.state_mount = StateMount(a.state, state_size)
        a.state_mount.mount()
    try:
        a.start()
        yield a
    finally:
        with contextlib.suppress(Exception):
            ids = dockerd("ps", "-aq", "--filter", f"label=cgtest={name}").split()
            if ids:
                dockerd("rm", "-f", *ids)
        with contextlib.suppress(Exception):
            for net in dockerd("network", "ls", "-q", "--filter", f"driver={name}").split():
                dockerd("network", "rm", net)
        if a.proc is not None:
            a.stop()
        if a.state_mount is not None:
            a.state_mount.close()
        a.cleanup()
