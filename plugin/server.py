"""Serve a WSGI app on a root-only unix socket (0600) from a pool of threads, and remove the
socket on stop."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer

from datapath.errors import Conflict, StateError

log = logging.getLogger(__name__)


def _in_use(path: Path) -> bool:
    """Whether something answers on `path` (a stale socket file from a crash does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            log.debug("probing %s: %s", path, exc)
        return False
    finally:
        probe.close()


class PooledWSGIServer(BaseWSGIServer):
    """Requests run on long-lived daemon threads, started as needed up to `workers`.

    Not a new thread per request (werkzeug's threaded mode): pyroute2 keeps state per thread
    that ever used an IPRoute (a netlink socket, a message queue) and never frees it, so a
    thread per request leaked two descriptors and ~60 KiB per endpoint created. A pool bounds
    that by its size. Requests beyond `workers` busy ones (e.g. open monitor streams) wait.
    """

    multithread = True

    def __init__(self, path: Path, app: Any, workers: int) -> None:
        super().__init__(f"unix://{path}", 0, app)
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._max = workers
        self._workers = 0
        self._idle = 0  # workers waiting for a job
        self._pending = 0  # jobs queued and not yet taken

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and self._workers < self._max:
                self._workers += 1
                threading.Thread(target=self._work, name=f"http-{self._workers}", daemon=True).start()
        self._jobs.put((request, client_address))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            if job is None:
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            workers, self._pending = self._workers, self._pending + self._workers
        for _ in range(workers):
            self._jobs.put(None)


class UnixServer:
    WORKERS = 64  # request threads per socket at most

    def __init__(self, path: Path, app: Any, name: str) -> None:
        self.path = path
        self.name = name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            if _in_use(path):
                raise Conflict(f"{path} is in use by another process; is another agent running?")
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise StateError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        old = os.umask(0o177)
        try:
            self.server: BaseWSGIServer = PooledWSGIServer(path, app, self.WORKERS)
        finally:
            os.umask(old)
        os.chown(path, 0, 0) if os.geteuid() == 0 else None
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"serve-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("%s listening on %s", self.name, self.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
