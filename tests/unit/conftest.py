"""Shared fixtures of the unit tier: an Agent wired to in-memory fakes, and Flask test clients.

Nothing here needs root, BCC or a kernel: the IPAM persists into MemoryStore, the datapath
is datapath.fake.FakeKernel and the HTTP edges are driven through Flask's test_client.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from flask.testing import FlaskClient

from datapath.fake import FakeKernel
from datapath.plan import Settings
from datapath.store import MemoryStore
from ipam.allocator import HostRanges, Ipam
from plugin.api.app import create_app as create_api
from plugin.docker.app import create_app as create_docker
from plugin.monitor import EventHub
from plugin.service import Agent
from tests.unit.helpers import HOST_V4, HOST_V6, DockerPlugin, FakeClock


@dataclass
class Stores:
    ipam: MemoryStore
    networks: MemoryStore
    endpoints: MemoryStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ranges() -> HostRanges:
    return HostRanges(HOST_V4, HOST_V6, ipv4_prefix=24, ipv6_prefix=80)


@pytest.fixture
def stores() -> Stores:
    return Stores(MemoryStore(), MemoryStore(), MemoryStore())


@pytest.fixture
def ipam(stores: Stores, ranges: HostRanges, clock: FakeClock) -> Ipam:
    return Ipam(stores.ipam, ranges, clock)


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def settings() -> Settings:
    return Settings(instance="cgtest", masquerade=True, program_revision="rev1")


@pytest.fixture
def agent(stores: Stores, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock) -> Agent:
    return Agent(stores.networks, stores.endpoints, ipam, kernel, settings, clock)


@pytest.fixture
def docker(agent: Agent) -> DockerPlugin:
    return DockerPlugin(create_docker(agent).test_client())


@pytest.fixture
def hub() -> EventHub:
    return EventHub()


@pytest.fixture
def api(agent: Agent, hub: EventHub) -> FlaskClient:
    app = create_api(agent, hub, lambda: {"pid": 4242, "state_dir": "/nonexistent"})
    return app.test_client()
