"""Serve a WSGI app on a root-only unix socket (0600) from a pool of threads, and remove the
socket on stop. Requests reach the pool only once complete; clients that stall are dropped."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
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


MAX_HEAD = 64 << 10  # request line and headers, at most
MAX_PREREAD = 1 << 20  # a body up to this (both apps' MAX_BODY) is read before a worker is given one
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def request_complete(data: bytes | bytearray) -> bool | None:
    """Whether `data` holds a whole request: its head and, for a Content-Length of up to
    MAX_PREREAD, its body (larger or chunked bodies, and an Expect: 100-continue, are left
    to the worker). None when the head is too long to be one."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None if len(data) > MAX_HEAD else False
    end, sep = (crlf, 4) if lf < 0 or 0 <= crlf < lf else (lf, 2)
    length = 0
    for line in bytes(data[:end]).split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in (b"transfer-encoding", b"expect"):
            return True
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return True  # the worker answers 400
    return length > MAX_PREREAD or len(data) >= end + sep + length


class _Prefixed(io.RawIOBase):
    """A socket's byte stream whose first bytes were read already."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        try:
            return int(self._raw.readinto(buffer))
        except ConnectionResetError:
            # A client that went away with a reset reads as the end of its stream: werkzeug
            # drains the socket after a reply and would skip closing the response on this error,
            # leaving a stream's generator (and its slot) open until garbage collection.
            return 0

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Connection:
    """An accepted socket handed to a request handler with the bytes read from it so far,
    which its input stream yields first; everything else is the socket's."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self._sock = sock
        self._head = head

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        if "r" in mode:
            return io.BufferedReader(_Prefixed(self._head, self._sock.makefile("rb", buffering=0)))
        sock: Any = self._sock
        return sock.makefile(mode, buffering, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass(eq=False)
class _Waiting:
    """A connection still sending its request."""

    sock: socket.socket
    address: Any
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class PooledWSGIServer(BaseWSGIServer):
    """Requests run on long-lived daemon threads, started as needed up to `workers`.

    Not a new thread per request (werkzeug's threaded mode): threads are reused, and anything a
    library keeps per thread is bounded by the pool's size (the kernel's netlink calls run on a
    thread of their own, datapath.kernel.netlink). Requests beyond `workers` busy ones wait.

    A connection gets a worker only once its request is complete (head and body): until then
    it waits in the serving thread's selector, holding a descriptor and its bytes, not a
    worker. One that has not sent a whole request `read_timeout` seconds after connecting is
    dropped (408 if it sent anything), and so is the oldest one when `MAX_WAITING` wait; the
    same timeout bounds every read and write of the worker that serves it. So clients that
    connect and stall cannot take the workers Docker's calls need.
    """

    multithread = True
    MAX_WAITING = 256  # connections still sending their request, per socket
    ACCEPT_BURST = 64  # connections taken per wake-up before the waiting ones are read

    def __init__(self, path: Path | tuple[str, int], app: Any, workers: int, read_timeout: float = 10.0) -> None:
        host, port = path if isinstance(path, tuple) else (f"unix://{path}", 0)
        super().__init__(host, port, app)
        self.read_timeout = read_timeout
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._max = workers
        self._workers = 0
        self._idle = 0  # workers waiting for a job
        self._pending = 0  # jobs queued and not yet taken
        self._waiting: dict[int, _Waiting] = {}  # by descriptor, oldest first
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._stopped = threading.Event()
        self._stopped.set()  # not serving

    # -- the serving thread: accept, read requests, hand complete ones to the pool --------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as sel:
                self.socket.setblocking(False)
                sel.register(self.socket, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    timeout = poll_interval
                    if self._waiting:
                        first = next(iter(self._waiting.values()))
                        timeout = min(timeout, max(0.0, first.deadline - time.monotonic()))
                    for key, _ in sel.select(timeout):
                        if key.fileobj is self.socket:
                            self._accept(sel)
                        elif key.fileobj is self._wake_r:
                            self._wake_r.recv(64)
                        else:
                            self._receive(sel, key.data)
                    self._expire(sel)
                for waiting in list(self._waiting.values()):
                    self._drop(sel, waiting)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._stopped.wait()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(self.ACCEPT_BURST):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: make room, the client retries
                log.debug("accept on %s: %s", self.server_address, exc)
                if self._waiting:
                    self._drop(sel, next(iter(self._waiting.values())))
                return
            if len(self._waiting) >= self.MAX_WAITING:
                self._drop(sel, next(iter(self._waiting.values())), TIMED_OUT)
            sock.setblocking(False)
            waiting = _Waiting(sock, address, time.monotonic() + self.read_timeout)
            self._waiting[sock.fileno()] = waiting
            sel.register(sock, selectors.EVENT_READ, waiting)

    def _receive(self, sel: selectors.BaseSelector, waiting: _Waiting) -> None:
        try:
            chunk = waiting.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # gone before sending a whole request
            self._drop(sel, waiting)
            return
        waiting.data += chunk
        complete = request_complete(waiting.data)
        if complete is None:
            self._drop(sel, waiting, TOO_LARGE)
        elif complete:
            sel.unregister(waiting.sock)
            del self._waiting[waiting.sock.fileno()]
            waiting.sock.settimeout(self.read_timeout)
            self._dispatch(_Connection(waiting.sock, bytes(waiting.data)), waiting.address)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._waiting:
            first = next(iter(self._waiting.values()))
            if first.deadline > now:
                return
            self._drop(sel, first, TIMED_OUT if first.data else b"")

    def _drop(self, sel: selectors.BaseSelector, waiting: _Waiting, reply: bytes = b"") -> None:
        sel.unregister(waiting.sock)
        del self._waiting[waiting.sock.fileno()]
        if reply:
            with contextlib.suppress(OSError):
                waiting.sock.send(reply)  # best effort, never blocking
        waiting.sock.close()

    # -- the pool -------------------------------------------------------------------------

    def _dispatch(self, request: Any, client_address: Any) -> None:
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
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            workers, self._pending = self._workers, self._pending + self._workers
        for _ in range(workers):
            self._jobs.put(None)


class UnixServer:
    WORKERS = 64  # request threads per socket at most
    READ_TIMEOUT = 10.0  # seconds a client has to send its request, and for each read and write after

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
            self.server: BaseWSGIServer = PooledWSGIServer(path, app, self.WORKERS, self.READ_TIMEOUT)
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


class TcpServer:
    """The opt-in HTTP listener (metrics, the service map): the same pooled server on host:port.
    Loopback unless the operator said otherwise (plugin.config checks it)."""

    WORKERS = 8

    def __init__(self, host: str, port: int, app: Any, name: str) -> None:
        self.name = name
        try:
            self.server: BaseWSGIServer = PooledWSGIServer((host, port), app, self.WORKERS, UnixServer.READ_TIMEOUT)
        except OSError as exc:
            raise StateError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"serve-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("%s listening on http://%s:%d", self.name, *self.address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
