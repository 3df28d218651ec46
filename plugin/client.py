"""Client of the agent's REST API over its unix socket. Standard library only.

The CLI and the CNI plugin both use it; importing it must stay cheap.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

DEFAULT_SOCKET = "/var/run/cellgate/cellgate.sock"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.cni_code = 0  # set when the agent answers a CNI call with a CNI error code


class AgentUnreachable(ApiError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the cellgate agent at {path}: {reason} (is `cellgate agent` running?)")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("cellgate", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _request(
        self, method: str, url: str, body: Any = None, timeout: float | None = None
    ) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.path, timeout if timeout is not None else self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise AgentUnreachable(self.path, exc.strerror or str(exc)) from None
        except PermissionError:
            conn.close()
            raise AgentUnreachable(self.path, "permission denied (the socket is root-only)") from None
        except OSError as exc:
            conn.close()
            raise AgentUnreachable(self.path, str(exc)) from None

    def call(self, method: str, url: str, body: Any = None) -> Any:
        resp = self._request(method, url, body)
        try:
            raw = resp.read()
        finally:
            resp.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(resp.status, f"agent sent a non-JSON reply ({resp.status})") from None
        if resp.status >= 400:
            message = payload.get("error") if isinstance(payload, dict) else None
            error = ApiError(resp.status, message or f"HTTP {resp.status}")
            if isinstance(payload, dict) and isinstance(payload.get("cni_code"), int):
                error.cni_code = payload["cni_code"]
            raise error
        return payload

    def get(self, url: str) -> Any:
        return self.call("GET", url)

    def post(self, url: str, body: Any = None) -> Any:
        return self.call("POST", url, body if body is not None else {})

    def stream(self, url: str, idle_timeout: float = 10.0) -> Iterator[dict[str, Any]]:
        """Objects of an NDJSON stream; heartbeats (blank lines) keep `idle_timeout` from firing."""
        for line in self.stream_lines(url, idle_timeout):
            yield json.loads(line)

    def stream_lines(self, url: str, idle_timeout: float = 10.0) -> Iterator[bytes]:
        """The lines of an NDJSON stream as sent (heartbeats left out), for passing them on unparsed."""
        resp = self._request("GET", url, timeout=idle_timeout)
        if resp.status >= 400:
            payload = json.loads(resp.read() or b"{}")
            raise ApiError(resp.status, payload.get("error", f"HTTP {resp.status}"))
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield line
        finally:
            resp.close()
