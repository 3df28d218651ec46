"""Load-balanced services: the pure model (datapath.services: parsing, validation, selectors,
resolution) and the Agent's service use cases on datapath.fake.FakeKernel, plus the REST edge.

VIPs of this file: 10.96.1.0/24 and fd96:1::/64.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from datapath import plan
from datapath import services as svc
from datapath.errors import Conflict, InvalidRequest, KernelError, NotFound
from datapath.fake import FakeKernel
from datapath.kernel import layout
from datapath.labels import Label
from datapath.model import Endpoint
from datapath.plan import LbService, ServedNetns, Settings, SockPrograms, VipRoute
from datapath.store import MemoryStore
from ipam.allocator import LOCAL_SPACE, HostRanges, Ipam, PoolRequest
from ipam.pool import Pool
from plugin.api.app import create_app
from plugin.monitor import EventHub
from plugin.service import Agent
from plugin.service.services import ServiceTable
from tests.unit.conftest import Stores
from tests.unit.helpers import FakeClock, hexid

IP = ipaddress.ip_address
VIP4, VIP4B, VIP6 = "10.96.1.10", "10.96.1.11", "fd96:1::10"
NET = hexid("svc-net")
CGROUP = "/sys/fs/cgroup/unified"


def fe(text: str) -> svc.Frontend:
    return svc.Frontend.parse(text)


def be(text: str) -> svc.Backend:
    return svc.Backend.parse(text)


# -- frontends and backends ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "address", "port", "proto"), [
    ("10.96.1.10:80", "10.96.1.10", 80, 6),
    ("10.96.1.10:80/tcp", "10.96.1.10", 80, 6),
    ("10.96.1.10:53/udp", "10.96.1.10", 53, 17),
    ("10.96.1.10:53/UDP", "10.96.1.10", 53, 17),
    (" 10.96.1.10:1 ", "10.96.1.10", 1, 6),
    ("10.96.1.10:65535", "10.96.1.10", 65535, 6),
    ("[fd96:1::10]:443", "fd96:1::10", 443, 6),
    ("[fd96:1::10]:53/udp", "fd96:1::10", 53, 17),
    ("[FD96:1:0:0::10]:8080/tcp", "fd96:1::10", 8080, 6),
])
def test_frontend_forms(text: str, address: str, port: int, proto: int) -> None:
    parsed = fe(text)
    assert parsed == svc.Frontend(IP(address), port, proto)
    assert fe(str(parsed)) == parsed  # the text form parses back to itself


def test_frontend_text_form() -> None:
    assert str(fe("10.96.1.10:80")) == "10.96.1.10:80/tcp"
    assert str(fe("[fd96:1::10]:53/udp")) == "[fd96:1::10]:53/udp"


@pytest.mark.parametrize(("text", "message"), [
    ("10.96.1.10:0", "port 0 is not in 1..65535"),
    ("10.96.1.10:65536", "port 65536 is not in 1..65535"),
    ("10.96.1.10:99999", "port 99999 is not in 1..65535"),
    ("10.96.1.10:80/sctp", "protocol 'sctp' is not tcp or udp"),
    ("10.96.1.10:80/", "expected VIP:PORT"),
    ("10.96.1.10", "expected VIP:PORT"),
    ("10.96.1.10:", "expected VIP:PORT"),
    (":80", "expected VIP:PORT"),
    ("10.96.1.10:http", "expected VIP:PORT"),
    ("fd96:1::10:80", "expected VIP:PORT"),  # IPv6 needs brackets
    ("10.96.1.300:80", "is not an IP address"),
    ("[fd96::1::2]:80", "is not an IP address"),
    ("127.0.0.1:80", "is a loopback address, not one a service can use"),
    ("[::1]:80", "is a loopback address, not one a service can use"),
    ("224.0.0.251:5353/udp", "is a multicast address, not one a service can use"),
    ("[ff02::fb]:5353/udp", "is a multicast address, not one a service can use"),
    ("0.0.0.0:80", "is a unspecified address, not one a service can use"),
    ("169.254.1.1:80", "is a link-local address, not one a service can use"),
    ("255.255.255.255:80", "broadcast"),
    ("", "expected VIP:PORT"),
])
def test_bad_frontends_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"frontend .*{message.replace('.', '[.]')}"):
        fe(text)


def test_backend_forms_and_refusals() -> None:
    assert be("10.1.0.2:8080") == svc.Backend(IP("10.1.0.2"), 8080)
    assert be("[fd00::2]:80") == svc.Backend(IP("fd00::2"), 80)
    assert str(be("[fd00::2]:80")) == "[fd00::2]:80"
    for bad, message in (("10.1.0.2:80/tcp", "expected IP:PORT"), ("10.1.0.2:0", "port 0"),
                         ("10.1.0.2", "expected IP:PORT"), ("127.0.0.1:80", "loopback"),
                         ("[ff02::1]:80", "multicast")):
        with pytest.raises(InvalidRequest, match=message):
            be(bad)


# -- requests -----------------------------------------------------------------------------


def test_a_request_with_backends() -> None:
    spec = svc.parse_request({"frontend": f"{VIP4}:80", "backends": ["10.1.0.3:8080", "10.1.0.2:8080"]})
    assert spec.name == "10-96-1-10-80-tcp"  # named after the frontend by default
    assert spec.backends == (be("10.1.0.3:8080"), be("10.1.0.2:8080"))  # as given: slot order
    assert not spec.by_labels and spec.target_port == 0
    same = svc.parse_request({"frontend": f"{VIP4}:80", "backends": "10.1.0.3:8080, 10.1.0.2:8080"})
    assert same == spec  # a comma-separated string is the CLI's form of the list


def test_a_request_with_a_selector_and_its_json_round_trip() -> None:
    spec = svc.parse_request({"frontend": f"[{VIP6}]:80", "selector": "tier=db, app=web", "target_port": 8080,
                              "name": "web"})
    assert (spec.name, spec.selector, spec.target_port, spec.backends) == (
        "web", ("any:app=web", "any:tier=db"), 8080, ())
    doc = spec.to_json()
    assert doc["selector"] == "app=web,tier=db"
    assert svc.ServiceSpec.from_json(json.loads(json.dumps(doc))) == spec


def test_a_request_without_backends_is_a_service_that_refuses() -> None:
    spec = svc.parse_request({"frontend": f"{VIP4}:80", "backends": []})
    assert spec.backends == () and not spec.by_labels


MANY = [f"10.1.{i // 250}.{i % 250 + 1}:80" for i in range(10_000)]


@pytest.mark.parametrize(("body", "message"), [
    ({}, "frontend .* is required"),
    ({"frontend": 80}, "frontend .* is required"),
    ({"frontend": f"{VIP4}:0", "backends": ["10.1.0.2:80"]}, "port 0"),
    ({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80", "10.1.0.2:80"]}, "backend 10.1.0.2:80 is listed twice"),
    ({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80", "10.1.0.2:080"]}, "is listed twice"),
    ({"frontend": f"{VIP4}:80", "backends": ["[fd00::2]:80"]}, "backend .* is IPv6, the frontend IPv4"),
    ({"frontend": f"[{VIP6}]:80", "backends": ["10.1.0.2:80"]}, "backend .* is IPv4, the frontend IPv6"),
    ({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80", "[fd00::2]:80"]}, "is IPv6, the frontend IPv4"),
    ({"frontend": f"{VIP4}:80", "backends": [f"{VIP4}:80"]}, "the frontend's own address"),
    ({"frontend": f"{VIP4}:80", "backends": MANY}, f"10000 backends; a service has at most {svc.MAX_SERVICE_BACKENDS}"),
    ({"frontend": f"{VIP4}:80", "backends": [80]}, "backends must be a list of IP:PORT strings"),
    ({"frontend": f"{VIP4}:80", "backends": {"a": 1}}, "backends must be a list"),
    ({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80"], "selector": "app=web", "target_port": 80},
     "backends or a selector, not both"),
    ({"frontend": f"{VIP4}:80", "selector": "app=web"}, "a selector needs --target-port in 1..65535"),
    ({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 65536}, "target-port in 1..65535"),
    ({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": "80"}, "target_port must be a number"),
    ({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": True}, "target_port must be a number"),
    ({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80"], "target_port": 80}, "target_port goes with a selector"),
    ({"frontend": f"{VIP4}:80", "selector": ["app=web"], "target_port": 80}, "selector must be a string"),
    ({"frontend": f"{VIP4}:80", "name": "Web_1"}, "name 'Web_1' must be 1-63 lower-case"),
    ({"frontend": f"{VIP4}:80", "name": "x" * 64}, "must be 1-63"),
    ({"frontend": f"{VIP4}:80", "name": "-web"}, "must be 1-63"),
    ("not an object", "must be a JSON object"),
])
def test_bad_requests_are_refused_and_say_why(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        svc.parse_request(body)


def test_ten_thousand_backends_are_refused_at_once_and_name_the_limit() -> None:
    with pytest.raises(InvalidRequest) as err:
        svc.parse_request({"frontend": f"{VIP4}:80", "backends": MANY})
    assert "4096" in str(err.value) and "10000" in str(err.value)
    limit = [f"10.1.{i // 250}.{i % 250 + 1}:80" for i in range(svc.MAX_SERVICE_BACKENDS)]
    assert len(svc.parse_request({"frontend": f"{VIP4}:80", "backends": limit}).backends) == 4096  # the limit itself


def test_stored_documents_are_strict() -> None:
    doc = svc.parse_request({"frontend": f"{VIP4}:80", "backends": ["10.1.0.2:80"]}).to_json()
    with pytest.raises(InvalidRequest, match="unknown field 'backend'"):
        svc.ServiceSpec.from_json({**doc, "backend": []})
    with pytest.raises(InvalidRequest, match="bad id"):
        svc.ServiceSpec.from_json({**doc, "id": -1})
    with pytest.raises(InvalidRequest, match="bad id"):
        svc.ServiceSpec.from_json({**doc, "id": svc.MAX_SERVICES + 1})
    with pytest.raises(InvalidRequest, match="bad node"):
        svc.ServiceSpec.from_json({**doc, "node": 7})


# -- selectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "terms"), [
    ("app=web", ("any:app=web",)),
    (" app=web , tier=db ", ("any:app=web", "any:tier=db")),
    ("tier=db,app=web", ("any:app=web", "any:tier=db")),  # canonical: sorted
    ("app=web,app=web", ("any:app=web",)),
    ("container:app=web", ("container:app=web",)),
    ("app=", ("any:app=",)),
    ("io.kubernetes/name=web-1", ("any:io.kubernetes/name=web-1",)),
])
def test_selector_forms(text: str, terms: tuple[str, ...]) -> None:
    assert svc.parse_label_selector(text)[1] == terms


@pytest.mark.parametrize(("text", "message"), [
    ("app in (a)", "selector term 'app in \\(a\\)': expected key=value"),
    ("app!=x", "selector term 'app!=x'"),
    ("app~web", "selector term 'app~web'"),
    ("app==web", "selector term 'app==web'"),
    ("app", "selector term 'app'"),
    ("=web", "selector term '=web'"),
    ("app=web,!tier", "selector term '!tier'"),
    ("app=w b", "selector term"),
    ("", "give at least one label"),
    (" , ,", "give at least one label"),
    ("app=web,app=db", "label app given twice with different values"),
    (",".join(f"k{i}=v" for i in range(17)), "17 labels; at most 16"),
])
def test_selector_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        svc.parse_label_selector(text)


def test_selector_errors_name_the_unsupported_operators() -> None:
    with pytest.raises(InvalidRequest, match="set operators such as `in`, `!=` or `~` are not supported"):
        svc.parse_request({"frontend": f"{VIP4}:80", "selector": "app in (a)", "target_port": 80})


# -- resolution ---------------------------------------------------------------------------


def cand(address: str, *labels: str, node: str = "") -> svc.Candidate:
    return svc.Candidate(IP(address), frozenset(Label.parse(x) for x in labels), node)


CANDIDATES = [
    cand("10.1.0.9", "container:app=web", "container:tier=fe"),
    cand("10.1.0.2", "container:app=web"),
    cand("fd00::2", "container:app=web"),
    cand("10.1.0.3", "container:app=db"),
    cand("10.2.0.7", "container:app=web", node="peer-1"),
    cand("10.1.0.4", "mesos:app=web"),
    cand("10.1.0.5"),
]


def selected(frontend: str, selector: str, candidates: list[svc.Candidate], port: int = 8080) -> list[str]:
    spec = svc.parse_request({"frontend": frontend, "selector": selector, "target_port": port})
    return [str(b) for b in svc.resolve(spec, candidates)]


def test_resolve_by_labels_in_a_stable_order_and_in_the_frontends_family() -> None:
    assert selected(f"{VIP4}:80", "app=web", CANDIDATES) == [
        "10.1.0.2:8080", "10.1.0.4:8080", "10.1.0.9:8080", "10.2.0.7:8080"]  # any source, any node, sorted
    assert selected(f"{VIP4}:80", "app=web", list(reversed(CANDIDATES))) == selected(f"{VIP4}:80", "app=web",
                                                                                       CANDIDATES)
    assert selected(f"[{VIP6}]:80", "app=web", CANDIDATES) == ["[fd00::2]:8080"]  # IPv6 VIP: IPv6 backends
    assert selected(f"{VIP4}:80", "container:app=web", CANDIDATES) == [
        "10.1.0.2:8080", "10.1.0.9:8080", "10.2.0.7:8080"]  # a source narrows it
    assert selected(f"{VIP4}:80", "app=web,tier=fe", CANDIDATES) == ["10.1.0.9:8080"]  # every label
    assert selected(f"{VIP4}:80", "app=nothing", CANDIDATES) == []
    assert selected(f"{VIP4}:53/udp", "app=db", CANDIDATES, port=5353) == ["10.1.0.3:5353"]


def test_resolve_keeps_address_backends_as_given_and_caps_selected_ones() -> None:
    spec = svc.parse_request({"frontend": f"{VIP4}:80", "backends": ["10.1.0.3:80", "10.1.0.2:80"]})
    assert svc.resolve(spec, CANDIDATES) == spec.backends
    many = [cand(f"10.{i // 65536 + 1}.{i // 256 % 256}.{i % 256}", "container:app=web")
            for i in range(svc.MAX_SERVICE_BACKENDS + 10)]
    assert len(selected(f"{VIP4}:80", "app=web", many)) == svc.MAX_SERVICE_BACKENDS


def test_check_frontend_refuses_endpoint_ranges_and_host_addresses() -> None:
    ranges = [ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("fd00::/64")]
    svc.check_frontend(fe(f"{VIP4}:80"), ranges, [IP("192.0.2.1")])
    svc.check_frontend(fe(f"[{VIP6}]:80"), ranges, [])
    with pytest.raises(InvalidRequest, match=re.escape("inside the endpoint range 10.1.0.0/24")):
        svc.check_frontend(fe("10.1.0.200:80"), ranges, [])
    with pytest.raises(InvalidRequest, match=re.escape("inside the endpoint range fd00::/64")):
        svc.check_frontend(fe("[fd00::99]:80"), ranges, [])
    with pytest.raises(InvalidRequest, match="is an address of this host"):
        svc.check_frontend(fe("192.0.2.1:80"), ranges, [IP("192.0.2.1")])


# -- the Agent's use cases ------------------------------------------------------------------


class Node:
    """An Agent on fakes whose stores outlive it: `rebuild()` is the agent started again."""

    def __init__(self, settings: Settings) -> None:
        self.stores = Stores(MemoryStore(), MemoryStore(), MemoryStore())
        self.services = MemoryStore()
        self.kernel = FakeKernel()
        self.kernel.addresses = [IP("192.0.2.1")]
        self.settings = settings
        self.agent = self.rebuild()

    def rebuild(self) -> Agent:
        ipam = Ipam(self.stores.ipam, HostRanges(ipaddress.IPv4Network("10.200.0.0/20"),
                                                 ipaddress.IPv6Network("fd00:cafe::/64"), 24, 80), FakeClock())
        self.agent = Agent(self.stores.networks, self.stores.endpoints, ipam, self.kernel, self.settings, FakeClock(),
                           services=self.services)
        self.agent.restore()
        return self.agent


@pytest.fixture
def node() -> Node:
    n = Node(Settings(instance="cgtest", masquerade=True, program_revision="rev1", cgroup=CGROUP))
    pool = n.agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    pool6 = n.agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("fd00:1::/64"), None, True))
    assert pool.gateway is not None and pool6.gateway is not None
    n.agent.create_network(NET, [pool.prefixed(pool.gateway), pool6.prefixed(pool6.gateway)])
    return n


def pools(agent: Agent) -> tuple[Pool, Pool]:
    by_version = {p.subnet.version: p for p in agent.ipam.pools()}
    return by_version[4], by_version[6]


def endpoint(node: Node, n: int, labels: dict[str, str] | None = None, sandbox: str = "") -> Endpoint:
    """What `docker run -l ...` does: addresses, CreateEndpoint, Join, then the labels."""
    agent, eid, mac = node.agent, hexid(f"svc-ep-{n}"), f"02:42:0a:00:01:{n:02x}"
    p4, p6 = pools(agent)
    _, a4 = agent.request_address(p4.id, None, mac=mac)
    _, a6 = agent.request_address(p6.id, None, mac=mac)
    agent.create_endpoint(NET, eid, p4.prefixed(a4.address), p6.prefixed(a6.address), mac)  # type: ignore[arg-type]
    if sandbox:
        agent.join(NET, eid, sandbox)
    if labels is not None:
        agent.set_labels(eid, labels)
    return agent.endpoint(eid)


def specs(store: MemoryStore) -> dict[str, Any]:
    """The stored service documents (without the numbering)."""
    return {k: v for k, v in store.docs.items() if k != "_ids"}


def lb(kernel: FakeKernel) -> dict[str, LbService]:
    return {str(o.frontend): o for o in kernel.objects.values() if isinstance(o, LbService)}


def vips(kernel: FakeKernel) -> set[str]:
    return {str(o.address) for o in kernel.objects.values() if isinstance(o, VipRoute)}


def service_objects(kernel: FakeKernel) -> dict[Any, Any]:
    return {k: o for k, o in kernel.objects.items() if isinstance(o, (LbService, VipRoute))}


def backends(kernel: FakeKernel, frontend: str) -> list[str]:
    return [str(b) for b in lb(kernel)[frontend].backends]


def ip4(ep: Endpoint) -> str:
    assert ep.ipv4 is not None
    return str(ep.ipv4.ip)


def ip6(ep: Endpoint) -> str:
    assert ep.ipv6 is not None
    return str(ep.ipv6.ip)


def test_create_writes_the_service_and_its_vip_route(node: Node) -> None:
    state = node.agent.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080", "10.1.0.51:8080"],
                                       "name": "web"})
    assert [str(b) for b in state.backends] == ["10.1.0.50:8080", "10.1.0.51:8080"]
    assert state.spec.node == "cgtest"
    (service,) = lb(node.kernel).values()
    assert service == LbService(fe(f"{VIP4}:80"), 1, (be("10.1.0.50:8080"), be("10.1.0.51:8080")))
    assert node.kernel.objects[("vip-route", VIP4)] == VipRoute(IP(VIP4), plan.naming.vip_metric("cgtest"))
    assert node.services.docs["web"]["frontend"] == f"{VIP4}:80/tcp"  # persisted
    assert [s.to_json() for s in node.agent.service_list()] == [state.to_json()]
    assert node.agent.service_get("web").to_json()["active_backends"] == ["10.1.0.50:8080", "10.1.0.51:8080"]


def test_services_of_both_families_and_protocols_share_nothing(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:53/udp", "backends": ["10.1.0.50:5353"]})
    a.service_create({"frontend": f"{VIP4}:53", "backends": ["10.1.0.51:53"]})
    a.service_create({"frontend": f"[{VIP6}]:53/udp", "backends": ["[fd00:1::50]:5353"]})
    assert set(lb(node.kernel)) == {f"{VIP4}:53/udp", f"{VIP4}:53/tcp", f"[{VIP6}]:53/udp"}
    assert len({s.rev_nat for s in lb(node.kernel).values()}) == 3  # one reverse-NAT index each
    assert vips(node.kernel) == {VIP4, VIP6}  # one route per VIP, whatever its ports


def test_the_socket_balancer_serves_the_agent_and_each_joined_sandbox(node: Node) -> None:
    served = {o for o in node.kernel.objects.values() if isinstance(o, ServedNetns)}
    assert served == {ServedNetns(0)}  # the agent's own namespace
    assert node.kernel.objects[("sock-programs", CGROUP)] == SockPrograms(CGROUP, "rev1")
    ep = endpoint(node, 1, sandbox="/var/run/docker/netns/svc1")
    assert ("served-netns", str(ep.sandbox_hash)) in node.kernel.objects
    node.agent.leave(NET, ep.id)
    assert {o for o in node.kernel.objects.values() if isinstance(o, ServedNetns)} == {ServedNetns(0)}


def test_a_duplicate_frontend_or_name_is_a_conflict_and_changes_nothing(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    before = (dict(node.kernel.objects), dict(node.services.docs), [s.to_json() for s in a.service_list()])
    applied = len(node.kernel.applied)
    with pytest.raises(Conflict, match=f"frontend {VIP4}:80/tcp is service web's already"):
        a.service_create({"frontend": f"{VIP4}:80/tcp", "backends": ["10.1.0.60:80"], "name": "other"})
    with pytest.raises(Conflict, match="service web exists"):
        a.service_create({"frontend": f"{VIP4B}:80", "backends": ["10.1.0.60:80"], "name": "web"})
    assert (dict(node.kernel.objects), dict(node.services.docs), [s.to_json() for s in a.service_list()]) == before
    assert len(node.kernel.applied) == applied


@pytest.mark.parametrize(("frontend", "message"), [
    ("10.1.0.200:80", "inside the endpoint range 10.1.0.0/24"),  # the network's subnet
    ("[fd00:1::99]:80", "inside the endpoint range fd00:1::/64"),
    ("10.200.9.1:80", "inside the endpoint range 10.200.0.0/20"),  # the IPAM's range: future networks
    ("[fd00:cafe::99]:80", "inside the endpoint range fd00:cafe::/64"),
    ("192.0.2.1:80", "an address of this host"),
])
def test_a_vip_that_someone_owns_is_refused_and_changes_nothing(node: Node, frontend: str, message: str) -> None:
    before = dict(node.kernel.objects)
    with pytest.raises(InvalidRequest, match=message):
        node.agent.service_create({"frontend": frontend, "backends": []})
    assert node.kernel.objects == before and node.services.docs == {} and node.agent.service_list() == []


def test_update_changes_only_that_services_objects(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    a.service_create({"frontend": f"{VIP4B}:80", "backends": ["10.1.0.60:8080"], "name": "api"})
    api_before = {k: o for k, o in service_objects(node.kernel).items() if VIP4B in " ".join(k)}
    others = {k: o for k, o in node.kernel.objects.items() if not isinstance(o, (LbService, VipRoute))}
    mark = len(node.kernel.applied)
    state = a.service_update("web", {"backends": ["10.1.0.50:8080", "10.1.0.51:8080"]})
    assert [str(b) for b in state.backends] == ["10.1.0.50:8080", "10.1.0.51:8080"]
    assert backends(node.kernel, f"{VIP4}:80/tcp") == ["10.1.0.50:8080", "10.1.0.51:8080"]
    assert {k: o for k, o in service_objects(node.kernel).items() if VIP4B in " ".join(k)} == api_before
    assert {k: o for k, o in node.kernel.objects.items() if not isinstance(o, (LbService, VipRoute))} == others
    touched = {o.key for p in node.kernel.applied[mark:] for o in (*p.add, *p.remove, *(n for _, n in p.change))}
    assert touched == {("lb-service", f"{VIP4}:80/tcp")}
    assert node.services.docs["web"]["backends"] == ["10.1.0.50:8080", "10.1.0.51:8080"]
    # a backend that left: the connections to it are reset
    a.service_update("web", {"backends": ["10.1.0.51:8080"]})
    assert node.kernel.resets[-1][0] == (be("10.1.0.50:8080"),)


def test_update_of_the_frontend_moves_the_service(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    a.service_update("web", {"frontend": f"{VIP4B}:8080"})
    assert set(lb(node.kernel)) == {f"{VIP4B}:8080/tcp"} and vips(node.kernel) == {VIP4B}
    assert backends(node.kernel, f"{VIP4B}:8080/tcp") == ["10.1.0.50:8080"]  # kept
    assert a.service_get("web").spec.frontend == fe(f"{VIP4B}:8080")


def test_bad_updates_are_refused_and_change_nothing(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    a.service_create({"frontend": f"{VIP4B}:80", "backends": [], "name": "api"})
    before = (dict(node.kernel.objects), dict(node.services.docs))
    with pytest.raises(NotFound, match="no service nope"):
        a.service_update("nope", {"backends": []})
    with pytest.raises(Conflict, match="is service api's already"):
        a.service_update("web", {"frontend": f"{VIP4B}:80"})
    with pytest.raises(InvalidRequest, match="listed twice"):
        a.service_update("web", {"backends": ["10.1.0.51:80", "10.1.0.51:80"]})
    with pytest.raises(InvalidRequest, match="inside the endpoint range"):
        a.service_update("web", {"frontend": "10.1.0.99:80"})
    with pytest.raises(InvalidRequest, match="selector term"):
        a.service_update("web", {"selector": "app!=x", "target_port": 80})
    assert (dict(node.kernel.objects), dict(node.services.docs)) == before


def test_delete_removes_its_objects_and_only_them(node: Node) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    a.service_create({"frontend": f"{VIP4}:443", "backends": ["10.1.0.51:8443"], "name": "tls"})
    assert a.service_delete("web").name == "web"
    assert set(lb(node.kernel)) == {f"{VIP4}:443/tcp"}
    assert vips(node.kernel) == {VIP4}  # still the VIP of `tls`
    assert node.kernel.resets[-1][0] == (be("10.1.0.50:8080"),)
    a.service_delete("tls")
    assert lb(node.kernel) == {} and vips(node.kernel) == set() and set(node.services.docs) <= {"_ids"}
    with pytest.raises(NotFound):
        a.service_delete("tls")
    with pytest.raises(NotFound):
        a.service_get("tls")


@pytest.mark.parametrize("failing", [VipRoute, LbService])
def test_a_failed_kernel_write_changes_nothing(node: Node, failing: type) -> None:
    a = node.agent
    a.service_create({"frontend": f"{VIP4B}:80", "backends": ["10.1.0.60:8080"], "name": "api"})
    before = (dict(node.kernel.objects), specs(node.services))
    node.kernel.fail = lambda o: isinstance(o, failing) and VIP4 in str(o.key)
    with pytest.raises(KernelError, match="injected failure"):
        a.service_create({"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:8080"], "name": "web"})
    node.kernel.fail = None
    assert [s.spec.name for s in a.service_list()] == ["api"]
    assert specs(node.services) == before[1]
    assert dict(node.kernel.objects) == before[0], "the failed create left kernel objects behind"


def test_a_label_selected_service_follows_the_endpoints(node: Node) -> None:
    a = node.agent
    web1 = endpoint(node, 1, {"app": "web"}, sandbox="/var/run/docker/netns/svc1")
    endpoint(node, 2, {"app": "db"})
    a.service_create({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 8080, "name": "web"})
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [f"{ip4(web1)}:8080"]

    web3 = endpoint(node, 3, {"app": "web"})  # created with the label: joins
    assert backends(node.kernel, f"{VIP4}:80/tcp") == sorted([f"{ip4(web1)}:8080", f"{ip4(web3)}:8080"])
    unlabelled = endpoint(node, 4)  # no labels yet: not a backend
    assert len(lb(node.kernel)[f"{VIP4}:80/tcp"].backends) == 2
    a.set_labels(unlabelled.id, {"app": "web"})  # labelled later: joins
    assert len(lb(node.kernel)[f"{VIP4}:80/tcp"].backends) == 3
    assert a.service_get("web").backends == lb(node.kernel)[f"{VIP4}:80/tcp"].backends

    a.set_labels(web3.id, {"app": "db"})  # relabelled: leaves, and its connections are reset
    assert f"{ip4(web3)}:8080" not in backends(node.kernel, f"{VIP4}:80/tcp")
    gone, paths = node.kernel.resets[-1]
    assert gone == (be(f"{ip4(web3)}:8080"),) and "/var/run/docker/netns/svc1" in paths
    a.delete_endpoint(NET, web1.id)  # deleted: leaves
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [f"{ip4(unlabelled)}:8080"]
    assert node.kernel.resets[-1][0] == (be(f"{ip4(web1)}:8080"),)
    a.delete_endpoint(NET, unlabelled.id)
    assert backends(node.kernel, f"{VIP4}:80/tcp") == []  # no backends: still there, refusing
    assert vips(node.kernel) == {VIP4}
    assert a.service_get("web").to_json()["active_backends"] == []


def test_a_dual_stack_endpoint_leaves_its_ipv4_and_ipv6_services(node: Node) -> None:
    a = node.agent
    web = endpoint(node, 1, {"app": "web"})
    stays = endpoint(node, 2, {"app": "web"})
    a.service_create({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 8080, "name": "web"})
    a.service_create({"frontend": f"[{VIP6}]:80", "selector": "app=web", "target_port": 8080, "name": "web6"})
    assert backends(node.kernel, f"[{VIP6}]:80/tcp") == sorted([f"[{ip6(web)}]:8080", f"[{ip6(stays)}]:8080"])
    a.set_labels(web.id, {"app": "db"})  # leaves both services at once
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [f"{ip4(stays)}:8080"]
    assert backends(node.kernel, f"[{VIP6}]:80/tcp") == [f"[{ip6(stays)}]:8080"]
    assert set(node.kernel.resets[-1][0]) == {be(f"{ip4(web)}:8080"), be(f"[{ip6(web)}]:8080")}
    a.delete_endpoint(NET, stays.id)
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [] == backends(node.kernel, f"[{VIP6}]:80/tcp")
    assert stays.id not in a.endpoints


def test_backends_keep_their_slots_when_an_unrelated_endpoint_changes(node: Node) -> None:
    for n in range(1, 4):
        endpoint(node, n, {"app": "web"})
    node.agent.service_create({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 80})
    before = lb(node.kernel)[f"{VIP4}:80/tcp"]
    mark = len(node.kernel.applied)
    endpoint(node, 9, {"app": "other"})
    assert lb(node.kernel)[f"{VIP4}:80/tcp"] == before
    assert not any(isinstance(o, LbService) for p in node.kernel.applied[mark:]
                   for o in (*p.add, *p.remove, *(n for _, n in p.change)))


def test_re_running_the_plan_is_a_no_op(node: Node) -> None:
    a = node.agent
    endpoint(node, 1, {"app": "web"}, sandbox="/var/run/docker/netns/svc1")
    a.service_create({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 8080})
    a.service_create({"frontend": f"[{VIP6}]:53/udp", "backends": ["[fd00:1::50]:5353"]})
    assert not plan.diff(a._desired(), node.kernel.observe())
    mark = len(node.kernel.applied)
    assert a.restore().changes == 0
    a.refresh_services()
    assert len(node.kernel.applied) == mark


def test_rev_nat_numbers_survive_an_agent_rebuilt_on_the_same_stores(node: Node) -> None:
    a = node.agent
    for i, name in enumerate(("a", "b", "c")):
        a.service_create({"frontend": f"10.96.1.{20 + i}:80", "backends": [f"10.1.0.{50 + i}:80"], "name": name})
    a.service_delete("a")  # frees number 1
    numbers = {k: o.rev_nat for k, o in lb(node.kernel).items()}
    assert sorted(numbers.values()) == [2, 3]
    objects = dict(node.kernel.objects)
    rebuilt = node.rebuild()  # restore() has run
    assert {k: o.rev_nat for k, o in lb(node.kernel).items()} == numbers
    assert node.kernel.objects == objects
    assert [s.to_json() for s in rebuilt.service_list()] == [s.to_json() for s in a.service_list()]
    rebuilt.service_create({"frontend": "10.96.1.30:80", "backends": [], "name": "d"})
    assert lb(node.kernel)["10.96.1.30:80/tcp"].rev_nat == 1  # the free one, never one in use


def test_a_label_selected_service_keeps_its_backends_across_an_agent_restart(node: Node) -> None:
    web = endpoint(node, 1, {"app": "web"}, sandbox="/var/run/docker/netns/svc1")
    node.agent.service_create({"frontend": f"{VIP4}:80", "selector": "app=web", "target_port": 8080, "name": "web"})
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [f"{ip4(web)}:8080"]
    objects = dict(node.kernel.objects)
    report = node.rebuild().restore()
    assert backends(node.kernel, f"{VIP4}:80/tcp") == [f"{ip4(web)}:8080"], \
        "after a restart the selector's backends must still be balanced to"
    assert node.agent.service_get("web").to_json()["active_backends"] == [f"{ip4(web)}:8080"]
    assert node.kernel.objects == objects and report.changes == 0


def test_reverse_nat_numbers_fit_the_maps_field() -> None:
    """struct cg_lb_value.rev_nat is a __u16: the table hands out 1..65535, or refuses."""
    table = ServiceTable(MemoryStore())
    table.ids = {f"taken-{n}": n for n in range(1, 0xFFFF + 1)}  # every number a __u16 holds, but 0
    try:
        number = table.number(fe(f"{VIP4}:80"))
    except Conflict:
        return
    value = layout.CgLbValue()
    value.rev_nat = number
    assert value.rev_nat == number, f"reverse-NAT index {number} does not fit cg_lb_value.rev_nat (__u16)"


def test_the_table_keeps_targets_and_backend_counts_per_change() -> None:
    """toServices targets and "is this backend still balanced" are kept per change (O(touched)),
    and agree with recomputing them from every active service."""
    table = ServiceTable(MemoryStore())
    shared = svc.Backend.parse("10.1.0.7:80")
    a = svc.parse_request({"frontend": f"{VIP4}:80", "backends": ["10.1.0.7:80", "10.1.0.8:80"], "name": "a"})
    b = svc.parse_request({"frontend": f"{VIP4}:81", "backends": ["10.1.0.7:80"], "name": "b"})
    c = svc.parse_request({"frontend": f"{VIP4}:82", "selector": "app=web", "target_port": 80, "name": "c"})
    for spec in (a, b, c):
        table.put(spec)

    def expected() -> tuple[set[svc.ServiceTarget], int]:
        active = table.active().values()
        return {svc.ServiceTarget.of(s) for s in active}, sum(len(table.backends(s)) for s in active)

    assert (set(table.targets()), table.total_backends) == expected()
    table.set_resolved(c.frontend, (svc.Backend.parse("10.1.0.9:80"),))
    assert table.balanced(svc.Backend.parse("10.1.0.9:80")) and table.total_backends == expected()[1]
    table.drop("a")
    assert table.balanced(shared) and not table.balanced(svc.Backend.parse("10.1.0.8:80"))
    table.put(svc.parse_request({"frontend": f"{VIP4}:81", "backends": ["10.1.0.8:80"], "name": "b"}))
    assert not table.balanced(shared) and table.balanced(svc.Backend.parse("10.1.0.8:80"))
    assert (set(table.targets()), table.total_backends) == expected()
    table.drop("c")
    assert not table.balanced(svc.Backend.parse("10.1.0.9:80")) and [t.name for t in table.targets()] == ["b"]


def test_stored_services_that_no_longer_parse_are_skipped(node: Node) -> None:
    node.agent.service_create({"frontend": f"{VIP4}:80", "backends": [], "name": "web"})
    node.services.put("junk", {"frontend": "nonsense"})
    assert [s.spec.name for s in node.rebuild().service_list()] == ["web"]


# -- the REST edge --------------------------------------------------------------------------


@pytest.fixture
def rest(node: Node) -> Callable[..., tuple[int, Any]]:
    client = create_app(node.agent, EventHub(), lambda: {"pid": 1, "state_dir": "/nonexistent"}).test_client()

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        resp = client.open(path, method=method, data=None if body is None else json.dumps(body))
        return resp.status_code, json.loads(resp.data)

    return call


def test_rest_create_get_update_list_delete(rest: Callable[..., tuple[int, Any]], node: Node) -> None:
    status, made = rest("POST", "/v1/services", {"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:80"]})
    assert status == 201 and made["name"] == "10-96-1-10-80-tcp" and made["active_backends"] == ["10.1.0.50:80"]
    assert rest("GET", "/v1/services/10-96-1-10-80-tcp") == (200, made)
    status, updated = rest("PUT", "/v1/services/10-96-1-10-80-tcp", {"backends": ["10.1.0.51:80"]})
    assert status == 200 and updated["active_backends"] == ["10.1.0.51:80"]
    assert rest("GET", "/v1/services") == (200, [updated])
    assert rest("DELETE", "/v1/services/10-96-1-10-80-tcp")[0] == 200
    assert rest("GET", "/v1/services") == (200, [])
    assert rest("GET", "/v1/services/10-96-1-10-80-tcp")[0] == 404


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"frontend": "10.1.0.9:80", "backends": []}, 400, "inside the endpoint range"),
    ({"frontend": f"{VIP4}:0", "backends": []}, 400, "port 0"),
    ({"frontend": f"{VIP4B}:80", "selector": "app in (a)", "target_port": 80}, 400, "selector term"),
    ({"frontend": f"{VIP4B}:80", "backends": MANY}, 400, "at most 4096"),
    ({"frontend": f"{VIP4}:80/tcp", "backends": []}, 409, "is service web's already"),
])
def test_rest_refusals_say_why_and_change_nothing(rest: Callable[..., tuple[int, Any]], node: Node,
                                                  body: dict[str, Any], status: int, message: str) -> None:
    rest("POST", "/v1/services", {"frontend": f"{VIP4}:80", "backends": ["10.1.0.50:80"], "name": "web"})
    listed = rest("GET", "/v1/services")
    objects = dict(node.kernel.objects)
    got, problem = rest("POST", "/v1/services", body)
    assert got == status and message in problem["error"], problem
    assert rest("GET", "/v1/services") == listed and node.kernel.objects == objects
