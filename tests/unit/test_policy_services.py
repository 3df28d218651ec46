"""toServices: the rule forms accepted and refused (with their messages), the compile of a selector
service (its endpoints) and of an address service (its backends' /32 and /128 CIDR identities),
traces that agree with the compiled entries, and the Agent keeping the policy in step with its
services: a rule naming a service that does not exist yet allows nothing until it is created, and
nothing once it is deleted; an address service's backends move its CIDR identities with them."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from datapath import identity as ids
from datapath import plan
from datapath import services as svc
from datapath.cidr import CidrIdentities, is_cidr_identity, labels_of
from datapath.errors import InvalidRequest
from datapath.fake import FakeKernel
from datapath.identity import Identities
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint
from datapath.plan import Settings
from datapath.policy import Repository, parse_rules
from datapath.policy.compile import compile_all, decide
from datapath.policy.parse import SERVICE_NAME
from datapath.policy.rules import named_prefixes, named_services
from datapath.policy.trace import Party, trace
from datapath.store import MemoryStore
from ipam.allocator import Ipam
from ipam.pool import Pool
from plugin.service import Agent
from plugin.service.policy import PolicyState
from tests.unit.conftest import Stores
from tests.unit.helpers import FakeClock, hexid
from tests.unit.test_cidr_policy import Recorder, ipcache
from tests.unit.test_service import make_endpoint, make_network

N = ipaddress.ip_network
TCP = 6
SEL = {"matchLabels": {"app": "web"}}
P5432 = [{"ports": [{"port": "5432", "protocol": "TCP"}]}]


def to_services(*names: str, ports: Any = None, **ref: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"toServices": [{"k8sService": {"serviceName": n, **ref}} for n in names]}
    if ports is not None:
        entry["toPorts"] = ports
    return {"endpointSelector": SEL, "egress": [entry]}


def cnp(namespace: str | None, spec: dict[str, Any], kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    metadata = {"name": "p", **({"namespace": namespace} if namespace is not None else {})}
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, "spec": spec}


# -- parse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [
    to_services("db"),
    to_services("db", namespace="default"),
    to_services("db", namespace=""),
    to_services("db.internal-2", ports=P5432),
    cnp(None, to_services("db")),  # a CNP of namespace default
    cnp("default", to_services("db")),
    cnp("prod", to_services("db", namespace="default")),
    cnp(None, to_services("db"), kind="CiliumClusterwideNetworkPolicy"),
], ids=["name", "default-namespace", "empty-namespace", "with-ports", "cnp", "cnp-default", "cnp-prod-names-default",
        "ccnp"])
def test_accepted_forms_name_the_service(doc: dict[str, Any]) -> None:
    (rule,) = parse_rules([doc])
    (pr,) = rule.egress
    assert pr.services in (("db",), ("db.internal-2",))
    assert pr.has_l3 and not pr.nobody and not pr.endpoints and not pr.cidrs
    assert named_services([rule]) == set(pr.services)


def test_an_empty_list_names_no_service_and_repeated_names_count_once() -> None:
    (rule,) = parse_rules([{"endpointSelector": SEL, "egress": [{"toServices": []}]}])
    assert rule.egress[0].nobody and rule.default_deny(egress=True)
    (rule,) = parse_rules([to_services("db", "db", "web")])
    assert rule.egress[0].services == ("db", "web")


def test_the_service_name_pattern_is_the_services_own() -> None:
    assert SERVICE_NAME.pattern == svc.NAME.pattern


@pytest.mark.parametrize(("doc", "message"), [
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sServiceSelector": {
        "selector": {"matchLabels": {"tier": "db"}}, "namespace": "default"}}]}]},
     "rule 0: egress[0].toServices[0].k8sServiceSelector: selecting services by their labels is not supported: "
     "cellgate services have no labels"),
    (to_services("db", namespace="prod"),
     "egress[0].toServices[0].k8sService.namespace: 'prod': cellgate services have no namespace"),
    (cnp("prod", to_services("db")),
     "a CiliumNetworkPolicy of namespace 'prod' names a service of its own namespace"),
    (to_services("DB"), "toServices[0].k8sService.serviceName: 'DB' is not a service name"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sService": {"namespace": "default"}}]}]},
     "toServices[0].k8sService.serviceName: None is not a service name"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sService": {"serviceName": 7}}]}]},
     "serviceName: 7 is not a service name"),
    ({"endpointSelector": SEL, "egress": [{"toServices": "db"}]}, "egress[0].toServices: must be a list"),
    ({"endpointSelector": SEL, "egress": [{"toServices": ["db"]}]},
     "toServices[0]: must be an object with k8sService"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{}]}]}, "toServices[0].k8sService: required"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sservice": {"serviceName": "db"}}]}]},
     "toServices[0]: unknown field 'k8sservice' (did you mean 'k8sService'?)"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sService": {"name": "db"}}]}]},
     "toServices[0].k8sService: unknown field 'name'"),
    ({"endpointSelector": SEL, "egressDeny": [{"toServices": [{"k8sService": {"serviceName": "db"}}]}]},
     "egressDeny[0].toServices: toServices is not supported in egressDeny"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [{"k8sService": {"serviceName": "db"}}],
                                           "toEndpoints": [SEL]}]},
     "egress[0]: combining toEndpoints and toServices is not supported (write them as two entries)"),
    ({"endpointSelector": SEL, "egress": [{"toServices": [], "toCIDR": ["10.0.0.0/8"]}]},
     "combining toCIDR and toServices is not supported"),
    ({"endpointSelector": SEL, "ingress": [{"toServices": [{"k8sService": {"serviceName": "db"}}]}]},
     "ingress[0]: toServices: services are egress peers only"),
    ({"endpointSelector": SEL, "ingress": [{"fromServices": [{"k8sService": {"serviceName": "db"}}]}]},
     "ingress[0]: fromServices: services are egress peers only"),
], ids=["k8sServiceSelector", "other-namespace", "cnp-of-another-namespace", "bad-name", "no-name", "name-not-text",
        "not-a-list", "item-not-object", "item-empty", "unknown-item-key", "unknown-ref-key", "deny",
        "with-endpoints", "with-cidr", "ingress", "fromServices"])
def test_refused_forms_say_why(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules([doc])
    assert message in str(err.value)


# -- compile and trace (pure) -----------------------------------------------------------------

WEB, DB, DB2, OTHER = 256, 257, 258, 259
WEB_L = frozenset({Label("container", "app", "web")})
DB_L = frozenset({Label("container", "app", "db")})
DB2_L = frozenset({Label("container", "app", "db"), Label("container", "io.kubernetes.pod.namespace", "prod")})
OTHER_L = frozenset({Label("container", "app", "other")})
B7, B8, B24, B6 = (1 << 24) + 1, (1 << 24) + 2, (1 << 24) + 3, (1 << 24) + 4
PREFIXES = {B7: "198.51.100.7/32", B8: "198.51.100.8/32", B24: "198.51.100.0/24", B6: "2001:db8::7/128"}
IDENTITIES: dict[int, LabelSet] = {**ids.RESERVED_LABELS, WEB: WEB_L, DB: DB_L, DB2: DB2_L, OTHER: OTHER_L,
                                   **{n: labels_of(N(p)) for n, p in PREFIXES.items()}}
SERVICES = {
    "db": svc.ServiceTarget("db", svc.parse_label_selector("app=db")[0]),
    "ext": svc.ServiceTarget("ext", None, (ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7"))),
    "reserved": svc.ServiceTarget("reserved", svc.parse_label_selector("reserved:host=")[0]),
    "empty": svc.ServiceTarget("empty"),
}


def allowed(doc: dict[str, Any], services: Any = SERVICES, port: int = 5432) -> set[int]:
    """The peers WEB may send to, from the compiled entries; the trace must say the same of each."""
    rules = parse_rules([doc])
    for i, r in enumerate(rules):
        object.__setattr__(r, "id", i + 1)
    subjects = {WEB: WEB_L}
    entries = compile_all(subjects, rules, IDENTITIES, "default", services)
    out = set()
    for peer, labels in IDENTITIES.items():
        if peer in (ids.ANY, WEB):
            continue
        d = decide(entries, WEB, True, peer, TCP, port)
        side = trace(rules, IDENTITIES, "default", Party(WEB, WEB_L, True), Party(peer, labels, False), TCP, port,
                     services=services)
        assert side.egress is not None and side.egress.allowed == d.allowed, (peer, "\n".join(side.lines))
        if d.allowed:
            out.add(peer)
    return out


def test_a_selector_service_allows_the_endpoints_its_selector_matches() -> None:
    assert allowed(to_services("db")) == {DB, DB2}  # a service has no namespace: every endpoint it selects


def test_an_address_service_allows_its_backends_cidr_identities_only() -> None:
    assert allowed(to_services("ext")) == {B7, B6}  # not the /24 holding 198.51.100.7, nor the other /32
    assert named_prefixes(parse_rules([to_services("ext")]), SERVICES) == {N("198.51.100.7/32"), N("2001:db8::7/128")}
    assert named_prefixes(parse_rules([to_services("db")]), SERVICES) == set()


def test_a_missing_or_empty_service_allows_nothing_and_still_turns_default_deny_on() -> None:
    assert allowed(to_services("nope")) == set()
    assert allowed(to_services("empty")) == set()
    assert allowed(to_services("db")) and allowed(to_services("db"), services={}) == set()


def test_a_service_selector_never_matches_a_reserved_identity() -> None:
    assert allowed(to_services("reserved")) == set()


def test_to_ports_restricts_the_backend_port() -> None:
    doc = to_services("db", "ext", ports=P5432)
    assert allowed(doc) == {DB, DB2, B7, B6}
    assert allowed(doc, port=80) == set()
    assert allowed(to_services("db"), port=80) == {DB, DB2}  # without toPorts: every port


def test_the_trace_names_the_services_and_what_they_stand_for() -> None:
    rules = parse_rules([to_services("db", "ext", "nope", ports=P5432)])
    me = Party(WEB, WEB_L, True)
    out = trace(rules, IDENTITIES, "default", me, Party(B7, IDENTITIES[B7], False, "198.51.100.7"), TCP, 5432,
                services=SERVICES)
    text = "\n".join(out.lines)
    assert out.allowed, text
    assert ('allows to services db (endpoints {"matchLabels":{"app":"db"}}) | ext (backends 198.51.100.7/32, '
            "2001:db8::7/128) | nope (no such service: allows nothing) on 5432/TCP: matches") in text
    out = trace(rules, IDENTITIES, "default", me, Party(B8, IDENTITIES[B8], False), TCP, 5432, services=SERVICES)
    assert not out.allowed and "peer not matched" in "\n".join(out.lines)


# -- the Agent: services created, deleted and changed under the rules ---------------------------

NET = hexid("svc-policy-net")
VIP = "10.96.7.10"
RULE = {"endpointSelector": SEL, "labels": ["name=to-db"],
        "egress": [{"toServices": [{"k8sService": {"serviceName": "db"}}], "toPorts": P5432}]}
EXT_RULE = {"endpointSelector": SEL, "labels": ["name=to-ext"],
            "egress": [{"toServices": [{"k8sService": {"serviceName": "ext", "namespace": "default"}}]}]}


@pytest.fixture
def pool(agent: Agent) -> Pool:
    return make_network(agent, NET, "10.78.0.0/24")


def ep(agent: Agent, pool: Pool, n: int, labels: dict[str, str]) -> Endpoint:
    made = make_endpoint(agent, NET, pool, hexid(f"svc-policy-ep-{n}"), n)
    return agent.set_labels(made.id, labels)


@pytest.fixture
def web(agent: Agent, pool: Pool) -> Endpoint:
    return ep(agent, pool, 1, {"app": "web"})


@pytest.fixture
def db(agent: Agent, pool: Pool) -> Endpoint:
    return ep(agent, pool, 2, {"app": "db"})


def may(kernel: FakeKernel, src: Endpoint, peer: int, port: int = 5432) -> bool:
    return decide(kernel.policy, src.identity, True, peer, TCP, port).allowed


def ip(e: Endpoint) -> str:
    assert e.ipv4 is not None
    return str(e.ipv4.ip)


def test_a_rule_naming_a_service_allows_nothing_until_it_exists_and_nothing_once_deleted(
        agent: Agent, kernel: FakeKernel, web: Endpoint, db: Endpoint) -> None:
    agent.policy_import(parse_rules([RULE]))
    assert not may(kernel, web, db.identity)  # fail closed: no service db yet
    agent.service_create({"name": "db", "frontend": f"{VIP}:5432", "selector": "app=db", "target_port": 5432})
    assert may(kernel, web, db.identity) and not may(kernel, web, db.identity, 80)
    # the trace agrees, by the backend's address as by its endpoint
    out = agent.trace(agent.party("endpoint", web.id), agent.party("ip", ip(db)), "5432/tcp")
    assert out.allowed and "to services db (endpoints" in "\n".join(out.lines)
    # membership follows by itself: a new endpoint with the labels is a peer at once
    db2 = ep(agent, agent.ipam.pool(next(iter(agent.ipam.pools())).id), 3, {"app": "db", "tier": "x"})
    assert may(kernel, web, db2.identity)
    agent.service_delete("db")
    assert not may(kernel, web, db.identity) and not may(kernel, web, db2.identity)
    assert not agent.trace(agent.party("endpoint", web.id), agent.party("ip", ip(db)), "5432/tcp").allowed


def test_a_rule_imported_after_the_service_allows_at_once(agent: Agent, kernel: FakeKernel, web: Endpoint,
                                                          db: Endpoint) -> None:
    agent.service_create({"name": "db", "frontend": f"{VIP}:5432", "selector": "app=db", "target_port": 5432})
    agent.policy_import(parse_rules([RULE]))
    assert may(kernel, web, db.identity)


class Order:
    """The kernel writes of a change, in order: `+ipcache P`, `-ipcache P`, `+policy N`, `-policy N`."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.events: list[str] = []
        apply, update = kernel.apply, kernel.policy_update

        def recorded_apply(p: plan.Plan) -> None:
            apply(p)
            self.events.extend(f"+ipcache {o.prefix}" for o in p.add if isinstance(o, plan.IpcacheEntry))
            self.events.extend(f"-ipcache {o.prefix}" for o in p.remove if isinstance(o, plan.IpcacheEntry))

        def recorded_update(upserts: dict[Any, Any], deletes: Any) -> None:
            deletes = list(deletes)
            update(upserts, deletes)
            self.events.extend(f"+policy {k.peer}" for k in upserts)
            self.events.extend(f"-policy {k.peer}" for k in deletes)

        kernel.apply = recorded_apply  # type: ignore[method-assign]
        kernel.policy_update = recorded_update  # type: ignore[method-assign]

    def at(self, event: str) -> int:
        return self.events.index(event)


def test_an_address_service_moves_its_cidr_identities_with_its_backends(agent: Agent, kernel: FakeKernel,
                                                                        web: Endpoint) -> None:
    agent.policy_import(parse_rules([EXT_RULE]))
    assert agent.policy.cidrs.prefixes() == {}
    originals = kernel.apply, kernel.policy_update
    rec = Recorder(agent, kernel)  # no address judged by entries the rules and services in force do not give
    agent.service_create({"name": "ext", "frontend": f"{VIP}:443",
                          "backends": ["198.51.100.7:443", "198.51.100.8:8443"]})
    kernel.apply, kernel.policy_update = originals  # type: ignore[method-assign]
    cache = ipcache(kernel)
    b7, b8 = cache["198.51.100.7/32"], cache["198.51.100.8/32"]
    assert is_cidr_identity(b7) and is_cidr_identity(b8)
    assert may(kernel, web, b7, 443) and may(kernel, web, b8, 1)  # no toPorts: every port
    assert rec.events.index("+ipcache 198.51.100.7/32") < rec.events.index("policy+")  # mapped, then allowed
    # the trace resolves the backend's address as the datapath does, and agrees
    out = agent.trace(agent.party("endpoint", web.id), agent.party("ip", "198.51.100.7"), "443/tcp")
    assert out.allowed and "ext (backends 198.51.100.7/32, 198.51.100.8/32)" in "\n".join(out.lines)
    order = Order(kernel)
    agent.service_update("ext", {"backends": ["198.51.100.8:8443", "198.51.100.9:443"]})
    cache = ipcache(kernel)
    assert "198.51.100.7/32" not in cache and cache["198.51.100.8/32"] == b8
    b9 = cache["198.51.100.9/32"]
    assert may(kernel, web, b9, 443) and not any(k.peer == b7 for k in kernel.policy)
    # the new backend's address is mapped before it is allowed; the old one is closed before it is unmapped
    assert order.at("+ipcache 198.51.100.9/32") < order.at(f"+policy {b9}")
    assert order.at(f"-policy {b7}") < order.at("-ipcache 198.51.100.7/32")
    assert b7 not in agent.policy.cidrs.prefixes().values()
    assert not agent.trace(agent.party("endpoint", web.id), agent.party("ip", "198.51.100.7"), "443/tcp").allowed
    agent.service_delete("ext")
    assert agent.policy.cidrs.prefixes() == {} and not any(is_cidr_identity(k.peer) for k in kernel.policy)


def test_a_service_no_rule_names_recompiles_nothing(agent: Agent, kernel: FakeKernel, web: Endpoint,
                                                    db: Endpoint) -> None:
    agent.policy_import(parse_rules([RULE]))
    order = Order(kernel)
    agent.service_create({"name": "other", "frontend": f"{VIP}:80", "backends": ["198.51.100.7:80"]})
    assert not any("policy" in e for e in order.events)  # the rules name db only: nothing recompiled
    assert agent.policy.cidrs.prefixes() == {} and "other" in agent.policy.services
    agent.service_create({"name": "db", "frontend": f"{VIP}:5432", "selector": "app=db", "target_port": 5432})
    assert any("policy" in e for e in order.events) and may(kernel, web, db.identity)


def test_a_failed_policy_write_keeps_the_old_targets_and_the_next_change_catches_up(
        agent: Agent, kernel: FakeKernel, web: Endpoint, db: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    agent.policy_import(parse_rules([RULE]))
    kernel.fail_policy = True
    with caplog.at_level(logging.ERROR):
        agent.service_create({"name": "db", "frontend": f"{VIP}:5432", "selector": "app=db", "target_port": 5432})
    assert "toServices policy not updated" in caplog.text
    assert "db" not in agent.policy.services and not may(kernel, web, db.identity)  # closed, as before
    kernel.fail_policy = False
    agent.service_create({"name": "other", "frontend": f"{VIP}:80", "backends": ["198.51.100.7:80"]})
    assert may(kernel, web, db.identity)


def test_the_ipcache_holds_service_prefixes_only_while_a_rule_names_them(agent: Agent, kernel: FakeKernel,
                                                                         web: Endpoint) -> None:
    agent.service_create({"name": "ext", "frontend": f"{VIP}:443", "backends": ["198.51.100.7:443"]})
    assert "198.51.100.7/32" not in ipcache(kernel)
    agent.policy_import(parse_rules([EXT_RULE]))
    assert is_cidr_identity(ipcache(kernel)["198.51.100.7/32"])
    agent.policy_delete([Label("unspec", "name", "to-ext")])
    assert "198.51.100.7/32" not in ipcache(kernel) and agent.policy.cidrs.prefixes() == {}
    assert {o.key for o in kernel.observe() if isinstance(o, plan.LbService)}  # the service itself stays


def test_adopt_services_at_restore_keeps_to_services_enforced_across_a_restart(
        stores: Stores, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock) -> None:
    """The restore hook: given the stored services before the restore's first sync, a restarted agent
    enforces toServices from its first policy write on (the restore must make this one call)."""
    kept = {"identities": MemoryStore(), "policy": MemoryStore(), "cidrs": MemoryStore(), "services": MemoryStore()}

    def start() -> Agent:
        policy = PolicyState(Identities(kept["identities"]), Repository(kept["policy"]), kernel,
                             cidrs=CidrIdentities(kept["cidrs"]))
        return Agent(stores.networks, stores.endpoints, ipam, kernel, settings, clock, policy=policy,
                     services=kept["services"])

    agent = start()
    pool = make_network(agent, NET, "10.78.0.0/24")
    web, db = ep(agent, pool, 1, {"app": "web"}), ep(agent, pool, 2, {"app": "db"})
    agent.policy_import(parse_rules([RULE, EXT_RULE]))
    agent.service_create({"name": "db", "frontend": f"{VIP}:5432", "selector": "app=db", "target_port": 5432})
    agent.service_create({"name": "ext", "frontend": f"{VIP}:443", "backends": ["198.51.100.7:443"]})
    before = dict(kernel.policy)
    again = start()
    again.policy.adopt_services(again.services.targets())
    again.restore()
    b7 = ipcache(kernel)["198.51.100.7/32"]
    assert is_cidr_identity(b7) and may(kernel, web, b7, 443) and may(kernel, web, db.identity)
    assert kernel.policy == before  # the same numbers, the same entries
