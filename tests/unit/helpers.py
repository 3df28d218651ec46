"""Plain helpers shared by the unit tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Any

from flask.testing import FlaskClient

from datapath.fake import FakeKernel
from plugin.service import Agent

HOST_V4 = ipaddress.IPv4Network("10.200.0.0/20")
HOST_V6 = ipaddress.IPv6Network("fd00:cafe::/64")


def hexid(seed: str) -> str:
    """A 64-character hexadecimal ID, like Docker's network and endpoint IDs."""
    return hashlib.sha256(seed.encode()).hexdigest()


class FakeClock:
    """A clock tests move by hand (the allocator's grace period, created stamps)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DockerPlugin:
    """Talks to the plugin app the way dockerd does: POST, raw JSON bytes, no Content-Type."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def raw(self, method: str, data: bytes = b"") -> tuple[int, Any]:
        resp = self.client.post(f"/{method}", data=data)
        assert "CONTENT_TYPE" not in resp.request.environ  # dockerd sets none
        return resp.status_code, json.loads(resp.data)

    def call(self, method: str, body: Any = None) -> tuple[int, Any]:
        # Go's json.Encoder ends the body with a newline; an empty body is sent as no bytes.
        data = b"" if body is None else json.dumps(body).encode() + b"\n"
        return self.raw(method, data)

    def ok(self, method: str, body: Any = None) -> Any:
        status, reply = self.call(method, body)
        assert status == 200, f"{method} -> {status} {reply}"
        assert "Err" not in reply, reply
        return reply


def snapshot(agent: Agent) -> tuple[Any, ...]:
    """Everything a failed request must leave unchanged."""
    fake = agent.kernel
    assert isinstance(fake, FakeKernel)
    return (
        dict(agent.networks),
        dict(agent.endpoints),
        agent.ipam.pools(),
        dict(fake.objects),
    )
