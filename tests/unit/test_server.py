"""The unix-socket servers under clients that misbehave: silence, half requests, long streams.

Real sockets in a temporary directory and the real Flask apps on the in-memory agent; no root.
Every wait is bounded and polls a condition.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.api import app as api_app
from plugin.docker.app import create_app as create_docker
from plugin.monitor import EventHub
from plugin.server import UnixServer
from plugin.service import Agent

HALF_REQUESTS = (
    b"",  # connects and says nothing
    b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n",  # headers never end
    b'POST /NetworkDriver.CreateEndpoint HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"Netw',  # body never ends
)
PROMPT = 2.0  # seconds a call may take while the sockets are under siege (it takes milliseconds)


def _connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: a full backlog makes a non-blocking connect fail at once
    sock.settimeout(timeout)
    return sock


def _call(path: Path, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
    """One complete request on a fresh connection, as dockerd and the CLI send them."""
    conn = http.client.HTTPConnection("localhost", timeout=5.0)
    conn.sock = _connect(path)
    try:
        conn.request(method, target, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _status(sock: socket.socket) -> int:
    """The status code of the response arriving on `sock` (waits at most the socket's timeout)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"connection closed after {line!r}")
        line += chunk
    return int(line.split()[1])


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(4096) == b""  # an early response (400/408) before the close counts too
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # poll interval, not a synchronisation point


@pytest.fixture
def sockets(tmp_path: Path, agent: Agent, hub: EventHub) -> Iterator[tuple[Path, Path, list[socket.socket]]]:
    """The plugin and API sockets served as the agent serves them, and a list for client sockets
    (closed before the servers stop)."""
    servers = [UnixServer(tmp_path / "plugin.sock", create_docker(agent), "docker plugin"),
               UnixServer(tmp_path / "api.sock", api_app.create_app(agent, hub, lambda: {}), "API")]
    clients: list[socket.socket] = []
    for server in servers:
        server.start()
    try:
        yield servers[0].path, servers[1].path, clients
    finally:
        for sock in clients:
            sock.close()
        for server in servers:
            server.stop()


def test_half_requests_do_not_stop_docker_or_api_calls(sockets: tuple[Path, Path, list[socket.socket]]) -> None:
    plugin, api, clients = sockets
    for path in (plugin, api):
        for n in range(2 * UnixServer.WORKERS + 4):  # more than the whole pool, twice
            sock = _connect(path)
            sock.sendall(HALF_REQUESTS[n % len(HALF_REQUESTS)])
            clients.append(sock)

    started = time.monotonic()
    assert _call(plugin, "POST", "/Plugin.Activate") == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    status, body = _call(plugin, "POST", "/NetworkDriver.GetCapabilities", b"{}\n")
    assert status == 200 and body["Scope"] == "local"
    status, body = _call(api, "GET", "/v1/status")
    assert status == 200 and body["monitor"]["subscribers"] == 0
    assert time.monotonic() - started < PROMPT


def test_a_client_silent_or_stuck_in_half_a_request_is_dropped(
    tmp_path: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(UnixServer, "READ_TIMEOUT", 0.3)
    server = UnixServer(tmp_path / "plugin.sock", create_docker(agent), "docker plugin")
    server.start()
    clients = []
    try:
        for data in HALF_REQUESTS:
            clients.append(_connect(server.path))
            clients[-1].sendall(data)
        _wait(lambda: all(_closed_by_server(c) for c in clients), 5.0, "the server to drop the stuck clients")
        # a client as slow as that, but complete within the timeout, is served
        sock = _connect(server.path)
        clients.append(sock)
        sock.sendall(b"POST /Plugin.Activate HTTP/1.1\r\n")
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing yet: the request is not complete
        sock.settimeout(5.0)
        sock.sendall(b"Content-Length: 0\r\n\r\n")
        assert _status(sock) == 200
    finally:
        for sock in clients:
            sock.close()
        server.stop()


def test_monitor_streams_beyond_their_bound_are_refused_and_other_calls_go_on(
    sockets: tuple[Path, Path, list[socket.socket]], hub: EventHub
) -> None:
    _, api, clients = sockets
    opened = UnixServer.WORKERS + 6  # without a bound these would hold every worker
    deadline = time.monotonic() + 5.0
    for _ in range(opened):
        sock = _connect(api)
        sock.sendall(b"GET /v1/monitor HTTP/1.1\r\nHost: cellgate\r\n\r\n")
        clients.append(sock)
    statuses = []
    for sock in clients:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        statuses.append(_status(sock))

    bound = api_app.MAX_STREAMS
    assert statuses.count(200) == bound and statuses.count(503) == opened - bound
    assert bound <= UnixServer.WORKERS // 4
    started = time.monotonic()
    status, body = _call(api, "GET", "/v1/status")
    assert status == 200 and body["monitor"]["subscribers"] == bound
    assert time.monotonic() - started < PROMPT

    for i, sock in enumerate(clients):  # the clients go away: their streams end at the next heartbeat ...
        if i % 2:  # half of them with a reset, as a killed process's socket does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    clients.clear()
    _wait(lambda: hub.subscribers == 0, 5.0, "the closed streams to end")

    def accepted() -> bool:  # ... and give their slots back as the server closes them
        sock = _connect(api)
        clients.append(sock)
        sock.sendall(b"GET /v1/monitor HTTP/1.1\r\nHost: cellgate\r\n\r\n")
        return _status(sock) == 200

    _wait(accepted, 5.0, "a monitor stream to be accepted again")
