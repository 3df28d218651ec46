"""CIDR policy compiled and enforced: CIDR identities as peers (with except), the world and cluster
entities, deny rules, traces that agree with the compiled entries, and the Agent's ordering of
policy entries and ipcache entries (never a moment where an address is more open than the rules)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datapath import identity as ids
from datapath import plan
from datapath.cidr import CidrIdentities, is_cidr_identity, labels_of
from datapath.errors import KernelError
from datapath.fake import FakeKernel
from datapath.identity import Identities
from datapath.labels import Label, LabelSet
from datapath.policy import Repository, parse_rules
from datapath.policy.compile import PolicyKey, compile_all, decide
from datapath.policy.trace import Party, trace
from datapath.store import MemoryStore
from ipam.pool import Pool
from plugin.service import Agent
from plugin.service.policy import PolicyState
from tests.unit.helpers import hexid
from tests.unit.test_service import make_endpoint, make_network

N = ipaddress.ip_network
TCP = 6
WEB, DB = 256, 257
WEB_L = frozenset({Label("container", "app", "web")})
DB_L = frozenset({Label("container", "app", "db")})
SEL = {"matchLabels": {"app": "web"}}
P443 = [{"ports": [{"port": "443", "protocol": "TCP"}]}]

# CIDR identities of the prefixes the rules below name (and one extra, inside an except)
C8, C16, C24, C32, C6, X24 = (1 << 24) + 1, (1 << 24) + 2, (1 << 24) + 3, (1 << 24) + 4, (1 << 24) + 5, \
    (1 << 24) + 6
PREFIXES = {C8: "10.0.0.0/8", C16: "10.1.0.0/16", C24: "198.51.100.0/24", C32: "198.51.100.7/32",
            C6: "2001:db8::/32", X24: "10.1.5.0/24"}
IDENTITIES: dict[int, LabelSet] = {**ids.RESERVED_LABELS, WEB: WEB_L, DB: DB_L,
                                   **{n: labels_of(N(p)) for n, p in PREFIXES.items()}}


def verdicts(rules_doc: list[dict[str, Any]], egress: bool = True, port: int = 443) -> dict[int, bool]:
    """Every peer's verdict for WEB, from the compiled entries; trace must say the same."""
    rules = parse_rules(rules_doc)
    for i, r in enumerate(rules):
        object.__setattr__(r, "id", i + 1)
    subjects = {WEB: WEB_L, DB: DB_L}
    entries = compile_all(subjects, rules, IDENTITIES)
    out = {}
    for peer, labels in IDENTITIES.items():
        if peer in (ids.ANY, ids.INIT):
            continue
        d = decide(entries, WEB, egress, peer, TCP, port)
        out[peer] = d.allowed
        me, other = Party(WEB, WEB_L, True), Party(peer, labels, peer in subjects)
        src, dst = (me, other) if egress else (other, me)
        side = trace(rules, IDENTITIES, "default", src, dst, TCP, port)
        got = side.egress if egress else side.ingress
        assert got is not None and got.allowed == d.allowed, (peer, "\n".join(side.lines))
    return out


def allowed(v: dict[int, bool]) -> set[int]:
    return {n for n, ok in v.items() if ok}


def test_to_cidr_allows_the_identities_inside_it_only() -> None:
    v = verdicts([{"endpointSelector": SEL, "egress": [{"toCIDR": ["198.51.100.0/24"], "toPorts": P443}]}])
    assert allowed(v) == {C24, C32}  # the /32 is inside the /24: it carries cidr:198.51.100.0/24
    assert not verdicts([{"endpointSelector": SEL, "egress": [{"toCIDR": ["198.51.100.0/24"],
                                                               "toPorts": P443}]}], port=80)[C24]


def test_except_leaves_out_the_prefixes_inside_it() -> None:
    v = verdicts([{"endpointSelector": SEL, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8",
                                                                      "except": ["10.1.0.0/16"]}]}]}])
    assert allowed(v) == {C8}  # not C16 (the except), not X24 (inside it)


def test_ipv6_cidrs() -> None:
    v = verdicts([{"endpointSelector": SEL, "ingress": [{"fromCIDR": ["2001:db8::/32"]}]}], egress=False)
    assert allowed(v) == {C6}


def test_the_world_entity_matches_every_cidr_identity_and_cluster_none() -> None:
    world = verdicts([{"endpointSelector": SEL, "egress": [{"toEntities": ["world"]}]}])
    assert allowed(world) == {ids.WORLD, *PREFIXES}
    cluster = verdicts([{"endpointSelector": SEL, "egress": [{"toEntities": ["cluster"]}]}])
    assert not allowed(cluster) & {ids.WORLD, *PREFIXES}
    assert {WEB, DB, ids.HOST} <= allowed(cluster)
    every = verdicts([{"endpointSelector": SEL, "egress": [{"toEntities": ["all"]}]}])
    assert set(PREFIXES) <= allowed(every)


def test_endpoint_selectors_never_select_cidr_identities() -> None:
    v = verdicts([{"endpointSelector": SEL, "egress": [{"toEndpoints": [{}]}]}])
    assert not allowed(v) & set(PREFIXES)


def test_a_cidr_deny_overrides_an_allow() -> None:
    v = verdicts([{"endpointSelector": SEL, "egress": [{"toEntities": ["world"]}],
                   "egressDeny": [{"toCIDR": ["198.51.100.7"]}]}])
    assert allowed(v) == {ids.WORLD, *PREFIXES} - {C32}
    v = verdicts([{"endpointSelector": SEL, "egress": [{"toCIDR": ["10.0.0.0/8"]}],
                   "egressDeny": [{"toCIDRSet": [{"cidr": "10.1.0.0/16"}], "toPorts": P443}]}])
    assert allowed(v) == {C8}
    assert allowed(verdicts([{"endpointSelector": SEL, "egress": [{"toCIDR": ["10.0.0.0/8"]}],
                              "egressDeny": [{"toCIDR": ["10.1.0.0/16"], "toPorts": P443}]}], port=80)) \
        == {C8, C16, X24}


def test_trace_names_the_cidr_rule_and_the_prefix() -> None:
    rules = parse_rules([{"endpointSelector": SEL, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8",
                                                                             "except": ["10.1.0.0/16"]}]}]}])
    out = trace(rules, IDENTITIES, "default", Party(WEB, WEB_L, True), Party(C16, IDENTITIES[C16], False, "10.1.2.3"),
                TCP, 443)
    text = "\n".join(out.lines)
    assert not out.allowed
    assert "10.1.2.3 [cidr:10.1.0.0/16, reserved:world] (identity 16777218)" in text
    assert "allows to CIDR 10.0.0.0/8 except 10.1.0.0/16 on every port: peer not matched" in text


# -- the PolicyState and the Agent: identities, ipcache entries, ordering ------------------------

NET = hexid("cidr-net")
EP = hexid("cidr-ep")
RULE = {"endpointSelector": SEL, "labels": ["name=out"],
        "egress": [{"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}]}]}


@pytest.fixture
def pool(agent: Agent) -> Pool:
    return make_network(agent, NET, "10.77.0.0/24")


@pytest.fixture
def web(agent: Agent, pool: Pool) -> Any:
    ep = make_endpoint(agent, NET, pool, EP)
    return agent.set_labels(ep.id, {"app": "web"})


def ipcache(kernel: FakeKernel) -> dict[str, int]:
    return {str(o.prefix): o.identity for o in kernel.observe() if isinstance(o, plan.IpcacheEntry)}


class Recorder:
    """Checks at every kernel change that no address is ever judged by entries the rules in force
    do not give: an ipcache entry of a CIDR identity appears only once the identity's entries are
    in (exactly those of the rules in force), and those entries go only once the ipcache entry went."""

    def __init__(self, agent: Agent, kernel: FakeKernel) -> None:
        self.events: list[str] = []
        apply, update = kernel.apply, kernel.policy_update

        def entries_of(peer: int, source: dict[PolicyKey, Any]) -> dict[PolicyKey, Any]:
            return {k: v for k, v in source.items() if k.peer == peer}

        def checked_apply(p: plan.Plan) -> None:
            for o in p.add:
                if isinstance(o, plan.IpcacheEntry) and is_cidr_identity(o.identity):
                    want = entries_of(o.identity, agent.policy.desired(agent.endpoints.values()))
                    assert entries_of(o.identity, kernel.policy) == want, f"{o} before its policy entries"
                    self.events.append(f"+ipcache {o.prefix}")
            apply(p)
            self.events.extend(f"-ipcache {o.prefix}" for o in p.remove if isinstance(o, plan.IpcacheEntry))

        def checked_update(upserts: dict[PolicyKey, Any], deletes: Any) -> None:
            deletes = list(deletes)
            update(upserts, deletes)
            remaining = {k.peer for k in kernel.policy}
            held = {o.identity for o in kernel.observe() if isinstance(o, plan.IpcacheEntry)}
            for key in deletes:
                if is_cidr_identity(key.peer) and key.peer not in remaining:
                    assert key.peer not in held, f"policy of {key.peer} removed while its ipcache entry is there"
                    self.events.append(f"-policy {key.peer}")
            if upserts:
                self.events.append("policy+")

        kernel.apply = checked_apply  # type: ignore[method-assign]
        kernel.policy_update = checked_update  # type: ignore[method-assign]


WORLD_RULE = {"endpointSelector": SEL, "labels": ["name=w"], "egress": [{"toEntities": ["world"]}]}


def test_import_gives_every_named_prefix_an_identity_and_an_ipcache_entry(agent: Agent, kernel: FakeKernel,
                                                                         web: Any) -> None:
    agent.policy_import(parse_rules([WORLD_RULE]))  # the new identities are world: allowed already
    rec = Recorder(agent, kernel)
    agent.policy_import(parse_rules([RULE]))
    cache = ipcache(kernel)
    n24, n25 = cache["198.51.100.0/24"], cache["198.51.100.128/25"]
    assert is_cidr_identity(n24) and is_cidr_identity(n25) and n24 != n25
    assert rec.events.index("+ipcache 198.51.100.0/24") > rec.events.index("policy+")
    out_rule = next(r.id for r in agent.policy.repository.rules if r.name == "name=out")
    by = {k.peer: v.rule for k, v in kernel.policy.items() if k.subject == web.identity and k.egress}
    assert by[n24] in (out_rule, by[ids.WORLD]) and by[n25] != out_rule  # the except: only world allows it
    # identity list and labels show them
    listed = {n: labels for n, labels, _ in agent.identity_list()}
    assert "cidr:198.51.100.0/24" in listed[n24] and "reserved:world" in listed[n24]
    assert agent.identity(n25)[0] == sorted(str(x) for x in labels_of(N("198.51.100.128/25")))
    # the policy map view names the peer's labels
    assert any(p == n24 and "cidr:198.51.100.0/24" in labels for (k, _, labels) in agent.policy_entries(web)
               for p in [k.peer])


def test_deleting_the_rule_removes_the_ipcache_entry_before_the_policy(agent: Agent, kernel: FakeKernel,
                                                                      web: Any) -> None:
    agent.policy_import(parse_rules([RULE, WORLD_RULE]))
    numbers = set(ipcache(kernel).values()) - {ids.HOST}
    rec = Recorder(agent, kernel)
    agent.policy_delete([Label("unspec", "name", "out")])
    assert not any(is_cidr_identity(n) for n in ipcache(kernel).values())
    assert not any(k.peer in numbers for k in kernel.policy)
    assert rec.events.index("-ipcache 198.51.100.0/24") < min(i for i, e in enumerate(rec.events)
                                                              if e.startswith("-policy"))
    assert agent.policy.cidrs.prefixes() == {}


def test_replacing_a_rule_keeps_shared_prefixes_under_their_numbers(agent: Agent, kernel: FakeKernel,
                                                                   web: Any) -> None:
    agent.policy_import(parse_rules([RULE]))
    before = ipcache(kernel)
    Recorder(agent, kernel)
    agent.policy_import(parse_rules([{**RULE, "egress": [{"toCIDR": ["198.51.100.0/24", "203.0.113.9"]}]}]))
    after = ipcache(kernel)
    assert after["198.51.100.0/24"] == before["198.51.100.0/24"]
    assert "198.51.100.128/25" not in after and is_cidr_identity(after["203.0.113.9/32"])


def test_a_failed_import_leaves_no_cidr_identity_nor_entry(agent: Agent, kernel: FakeKernel, web: Any) -> None:
    kernel.fail = lambda o: isinstance(o, plan.IpcacheEntry)
    with pytest.raises(KernelError):
        agent.policy_import(parse_rules([RULE]))
    kernel.fail = None
    assert not any(is_cidr_identity(n) for n in ipcache(kernel).values())
    assert agent.policy.cidrs.prefixes() == {} and agent.policy.repository.rules == []
    assert not any(is_cidr_identity(k.peer) for k in kernel.policy)
    kernel.fail_policy = True
    with pytest.raises(KernelError):
        agent.policy_import(parse_rules([RULE]))
    assert agent.policy.cidrs.prefixes() == {} and not ipcache(kernel).keys() - {"10.77.0.1/32"}


def test_host_addresses_and_endpoints_keep_their_own_identity(agent: Agent, kernel: FakeKernel, web: Any) -> None:
    agent.host_addresses = [ipaddress.ip_address("198.51.100.1")]
    ep_ip = str(web.ipv4.ip)
    agent.policy_import(parse_rules([{**RULE, "egress": [{"toCIDR": ["198.51.100.1", ep_ip, "10.0.0.0/8"]}]}]))
    cache = ipcache(kernel)
    assert cache["198.51.100.1/32"] == ids.HOST
    src = agent.party("ip", ep_ip)
    assert src.identity == web.identity and src.local
    assert agent.party("ip", "198.51.100.1").identity == ids.HOST
    assert agent.party("ip", "10.9.9.9").identity == cache["10.0.0.0/8"]
    assert agent.party("ip", "192.0.2.1").identity == ids.WORLD
    assert agent.trace(src, agent.party("ip", "10.9.9.9"), "443/tcp").allowed
    assert not agent.trace(src, agent.party("ip", "192.0.2.1"), "443/tcp").allowed


def test_trace_by_address_follows_the_longest_prefix(agent: Agent, kernel: FakeKernel, web: Any) -> None:
    agent.policy_import(parse_rules([RULE]))
    src = agent.party("endpoint", web.id)
    inside, excepted = agent.party("ip", "198.51.100.7"), agent.party("ip", "198.51.100.200")
    assert inside.identity == ipcache(kernel)["198.51.100.0/24"] and not inside.local
    assert excepted.identity == ipcache(kernel)["198.51.100.128/25"]
    assert agent.trace(src, inside, "80/tcp").allowed
    result = agent.trace(src, excepted, "80/tcp")
    assert not result.allowed and "198.51.100.200 [cidr:198.51.100.128/25" in "\n".join(result.lines)
    # ingress: the world side has no policy of its own here
    back = agent.trace(inside, src, "80/tcp")
    assert back.egress is None and back.ingress is not None
    with pytest.raises(Exception, match="not an IPv4 or IPv6 address"):
        agent.party("ip", "nope")


def test_cidr_identities_survive_a_restart(kernel: FakeKernel) -> None:
    cidr_store, rule_store = MemoryStore(), MemoryStore()
    first = PolicyState(Identities(MemoryStore()), Repository(rule_store), kernel,
                        cidrs=CidrIdentities(cidr_store))
    first.import_rules(parse_rules([RULE]), [])
    numbers = first.cidrs.prefixes()
    again = PolicyState(Identities(MemoryStore()), Repository(rule_store), kernel, cidrs=CidrIdentities(cidr_store))
    assert again.cidrs.prefixes() == numbers
    assert {e.prefix for e in again.cidr_entries()} == set(numbers)
    # a prefix no stored rule names (a crash mid-change) is dropped; a missing one is made
    cidr_store.put("extra", {"prefix": "192.0.2.0/24", "id": (1 << 24) + 99})
    cidr_store.delete("198.51.100.128_25")
    third = PolicyState(Identities(MemoryStore()), Repository(rule_store), kernel, cidrs=CidrIdentities(cidr_store))
    assert set(third.cidrs.prefixes()) == set(numbers)
    assert third.cidrs.prefixes()[N("198.51.100.0/24")] == numbers[N("198.51.100.0/24")]


def test_restore_writes_the_cidr_ipcache_entries(agent: Agent, kernel: FakeKernel, web: Any) -> None:
    agent.policy_import(parse_rules([RULE]))
    want = ipcache(kernel)
    for key in [k for k, o in kernel.objects.items() if isinstance(o, plan.IpcacheEntry)]:
        del kernel.objects[key]
    agent.restore()
    assert ipcache(kernel) == want


def test_the_rest_api_traces_by_address(agent: Agent, api: Any, web: Any) -> None:
    agent.policy_import(parse_rules([RULE]))
    for dst, verdict in (("198.51.100.9", "ALLOWED"), ("198.51.100.129", "DENIED"), ("192.0.2.1", "DENIED")):
        resp = api.post("/v1/policy/trace", json={"src": {"endpoint": web.id}, "dst": {"ip": dst}, "dport": "80/tcp"})
        assert resp.status_code == 200, resp.data
        assert resp.get_json()["verdict"] == verdict, (dst, resp.get_json()["lines"])
    resp = api.post("/v1/policy/trace", json={"src": {"ip": "300.1.1.1"}, "dst": {"endpoint": web.id}})
    assert resp.status_code == 400 and "not an IPv4 or IPv6 address" in resp.get_data(as_text=True)


def test_tables_show_a_cidr_identity_by_its_own_prefix() -> None:
    from plugin.cli import _labels_text

    labels = sorted(str(lb) for lb in labels_of(N("10.1.0.0/16")))
    assert _labels_text(labels) == "cidr:10.1.0.0/16, reserved:world"
    assert _labels_text(["container:app=web"]) == "container:app=web"
