"""A real etcd for tests and the simulated cluster: own data dir, free ports, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.servers import ServerProcess


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer(ServerProcess):
    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0, netns: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.netns = netns
        self.port = port or free_port(host if not netns else "127.0.0.1")
        self.peer_port = free_port(host if not netns else "127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = ["etcd", "--name", "cg", "--data-dir", str(self.data_dir),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
               "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
               "--initial-cluster", f"cg=http://{self.host}:{self.peer_port}",
               "--log-level", "warn"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        logf = open(self.log, "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not answer at {self.url} within {timeout} s")

    def healthy(self) -> bool:
        cmd = ["etcdctl", "--endpoints", self.url, "--dial-timeout", "1s", "--command-timeout", "1s",
               "endpoint", "health"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(cmd, capture_output=True, env=env, check=False).returncode == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.end(sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, empty: bool = False) -> None:
        self.stop()
        if empty:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def compact(self) -> int:
        """Compact at the current revision; returns it."""
        env = dict(os.environ, ETCDCTL_API="3")
        pre = ["ip", "netns", "exec", self.netns] if self.netns else []
        out = subprocess.run([*pre, "etcdctl", "--endpoints", self.url, "endpoint", "status", "-w", "json"],
                             capture_output=True, env=env, check=True, text=True).stdout
        import json

        revision = int(json.loads(out)[0]["Status"]["header"]["revision"])
        subprocess.run([*pre, "etcdctl", "--endpoints", self.url, "compaction", "--physical", str(revision)],
                       capture_output=True, env=env, check=True)
        return revision

