"""The agent's side of the L7 proxy: start it (or adopt the one a crashed agent left running),
restart it when it exits, stop it on a clean shutdown, and publish its events (datagrams on a
root-only socket in the state dir) to the agent's event hub. Imports no kernel code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MARKER = "plugin.proxy"


def choose_port(state: Path, wanted: int) -> int:
    """The proxy's port: the one asked for, else the one chosen at first start (kept in `state`)."""
    path = state / "port"
    if wanted:
        return wanted
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(f"{port}\n")
    return port


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class ProxySupervisor:
    def __init__(self, state: Path, pin_dir: Path, port: int, access_log: str,
                 publish: Callable[[dict[str, Any]], None], debug: bool = False, workers: int = 1) -> None:
        self.state = state
        self.pin_dir = pin_dir
        self.port = port
        self.access_log = access_log
        self.publish = publish
        self.debug = debug
        self.workers = workers
        self.filters = state / "filters.json"
        self.events_path = state / "events.sock"
        self.pid_path = state / "proxy.pid"
        self.pid = 0
        self.restarts = 0
        self._stopping = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._events: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def listening(self) -> bool:
        """Whether a socket listens on the proxy's port in this network namespace (read from
        /proc/net/tcp*, so asking opens no connection to the proxy)."""
        wanted = f":{self.port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
            except OSError:
                continue
            if any(len(f) > 3 and f[1].endswith(wanted) and f[3] == "0A" for f in rows):  # 0A: LISTEN
                return True
        return False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state, 0o700)
        self._bind_events()
        if not self._adopt():
            stop_left_over(self.state)  # ours but for another port (the flag changed): replaced
            self._spawn()
        for target, name in ((self._watch, "cg-proxy-watch"), (self._read_events, "cg-proxy-events")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the proxy (a clean agent shutdown; a crash leaves it serving for the next agent)."""
        self._stopping.set()
        pid = self.pid
        if pid and self._ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if self._child is not None:
                try:
                    self._child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._child.kill()
                    self._child.wait()
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        if self._events is not None:
            self._events.close()

    def _ours(self, pid: int) -> bool:
        cmd = _cmdline(pid)
        return MARKER in cmd and str(self.filters) in cmd

    def _adopt(self) -> bool:
        try:
            pid = int(self.pid_path.read_text())
        except (OSError, ValueError):
            return False
        if not self._ours(pid) or f"{self.port}" not in _cmdline(pid):
            return False
        self.pid = pid
        log.info("L7 proxy %d (left by an earlier agent) adopted", pid)
        return True

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", MARKER, "--pin-dir", str(self.pin_dir), "--filters", str(self.filters),
               "--port", str(self.port), "--events", str(self.events_path), "--workers", str(self.workers)]
        if self.access_log:
            cmd += ["--access-log", self.access_log]
        if self.debug:
            cmd.append("--debug")
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._child = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, env=env)
        self.pid = self._child.pid
        self.pid_path.write_text(f"{self.pid}\n")
        log.info("L7 proxy %d started on port %d", self.pid, self.port)

    def _watch(self) -> None:
        """Restart the proxy whenever it exits, with a short back-off against crash loops."""
        delay = 0.1
        while not self._stopping.is_set():
            started = time.monotonic()
            self._wait_exit(self.pid)
            if self._stopping.is_set():
                return
            log.error("L7 proxy %d exited; L7 flows are dropped until it is back", self.pid)
            if time.monotonic() - started > 10:
                delay = 0.1
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 2.0)
            self.restarts += 1
            self._spawn()

    def _wait_exit(self, pid: int) -> None:
        if self._child is not None and self._child.pid == pid:
            self._child.wait()
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)

    # -- events -------------------------------------------------------------------------------

    def _bind_events(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.events_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(self.events_path))
        finally:
            os.umask(old)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._events = sock

    def _read_events(self) -> None:
        sock = self._events
        assert sock is not None
        while not self._stopping.is_set():
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.publish(event)


def stop_left_over(state: Path) -> int:
    """`cellgate cleanup`: end the proxy a crashed agent left running (by its PID file, if the
    process is ours). Its PID, or 0."""
    try:
        pid = int((state / "proxy.pid").read_text())
    except (OSError, ValueError):
        return 0
    cmd = _cmdline(pid)
    if MARKER not in cmd or str(state / "filters.json") not in cmd:
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
            try:
                if not select.select([fd], [], [], 5)[0]:
                    os.kill(pid, signal.SIGKILL)
            finally:
                os.close(fd)
    return pid
