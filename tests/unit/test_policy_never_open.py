"""Issue 9, "never fail open": what the policy language cannot enforce as written is refused, and what
it accepts is enforced no more openly than written (CRD spec+specs, namespaces, `{}` peers, empty lists,
unenforceable subjects, hostile input). Each verdict is checked against the compiled datapath entries
(`decide`) and against `policy trace`, which must agree."""

from __future__ import annotations

import json
from typing import Any

import pytest

from datapath import identity as ids
from datapath.errors import InvalidRequest
from datapath.labels import Label, LabelSet
from datapath.policy import MAX_DEPTH, MAX_NODES, Repository, Rule, parse_rules
from datapath.policy.compile import Entries, compile_all, decide, enforcement
from datapath.policy.trace import Party, trace
from datapath.store import MemoryStore

TCP = 6
NS = "io.kubernetes.pod.namespace"


def L(source: str, **labels: str) -> LabelSet:
    return frozenset(Label(source, k.replace("_", "."), v) for k, v in labels.items())


# Endpoints of three namespaces, from three runtimes; "default" ones carry no namespace label at all.
WEB = 256  # default (no label)
DB = 257  # default (no label)
WEB_PROD = 258  # Docker label io.kubernetes.pod.namespace=prod
DB_PROD = 259  # CNI K8S_POD_NAMESPACE=prod
DB_OTHER = 260  # Mesos label, namespace other
DB_DEFAULT_LABELLED = 261  # says "default" explicitly
IDENTITIES: dict[int, LabelSet] = {
    **ids.RESERVED_LABELS,
    WEB: L("container", app="web"),
    DB: L("container", app="db", env="prod"),
    WEB_PROD: frozenset({Label("container", "app", "web"), Label("container", NS, "prod")}),
    DB_PROD: frozenset({Label("cni", "app", "db"), Label("cni", "env", "prod"), Label("cni", NS, "prod")}),
    DB_OTHER: frozenset({Label("mesos", "app", "db"), Label("mesos", NS, "other")}),
    DB_DEFAULT_LABELLED: frozenset({Label("container", "app", "db"), Label("container", NS, "default")}),
}
ENDPOINTS = {n for n in IDENTITIES if n >= ids.FIRST_ALLOCATED}
RESERVED = {n for n in IDENTITIES if n < ids.FIRST_ALLOCATED}
SUBJECTS = {n: lb for n, lb in IDENTITIES.items() if n in ENDPOINTS or n == ids.INIT}
WEB_SEL = {"matchLabels": {"app": "web"}}
DB_SEL = {"matchLabels": {"app": "db"}}
P80 = [{"ports": [{"port": "80", "protocol": "TCP"}]}]


def cnp(namespace: str | None = None, kind: str = "CiliumNetworkPolicy", **fields: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, **fields}


def ccnp(**fields: Any) -> dict[str, Any]:
    return cnp(kind="CiliumClusterwideNetworkPolicy", **fields)


def numbered(data: Any) -> list[Rule]:
    return [r.numbered(i) for i, r in enumerate(parse_rules(data), start=1)]


def compiled(data: Any) -> Entries:
    return compile_all(SUBJECTS, numbered(data), IDENTITIES)


def admitted(data: Any, subject: int, egress: bool = False, port: int = 80) -> set[int]:
    """The peers the datapath lets in (or out) on TCP/port, checked against `policy trace` too."""
    rules = numbered(data)
    entries = compile_all(SUBJECTS, rules, IDENTITIES)
    out = set()
    for peer, labels in IDENTITIES.items():
        allowed = decide(entries, subject, egress, peer, TCP, port).allowed
        me, other = Party(subject, IDENTITIES[subject], True), Party(peer, labels, False)
        src, dst = (me, other) if egress else (other, me)
        side = trace(rules, IDENTITIES, "default", src, dst, TCP, port)
        decision = side.egress if egress else side.ingress
        assert decision is not None and decision.allowed == allowed, (peer, side.lines)
        if allowed:
            out.add(peer)
    return out


def refused(data: Any, *fragments: str) -> str:
    with pytest.raises(InvalidRequest) as err:
        parse_rules(data)
    text = str(err.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


# -- 1. a CRD with both spec and specs ------------------------------------------------------------


def test_a_crd_with_spec_and_specs_applies_both() -> None:
    doc = ccnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]},
               specs=[{"endpointSelector": DB_SEL, "egress": [{"toEndpoints": [WEB_SEL]}]},
                      {"endpointSelector": WEB_SEL, "egress": [{}]}])
    rules = parse_rules(doc)
    assert len(rules) == 3
    assert [bool(r.ingress) for r in rules] == [True, False, False]
    entries = compiled(doc)
    assert enforcement(WEB, IDENTITIES[WEB], rules, "default").egress  # from specs[1]
    assert not decide(entries, DB, True, ids.WORLD, TCP, 80).allowed  # from specs[0]
    assert decide(entries, WEB, False, DB, TCP, 80).allowed  # from spec


@pytest.mark.parametrize(("fields", "fragment"), [
    ({}, "needs spec or specs"),
    ({"specs": []}, "needs spec or specs"),
    ({"spec": None}, "needs spec or specs"),
    ({"specs": {"endpointSelector": {}}}, "specs must be a list"),
])
def test_a_crd_without_rules_is_refused(fields: dict[str, Any], fragment: str) -> None:
    refused(cnp(**fields), "policy 0", fragment)


def test_errors_in_a_crd_name_spec_or_specs() -> None:
    good = {"endpointSelector": WEB_SEL, "egress": [{}]}
    refused(cnp(spec={"endpointSelector": WEB_SEL, "egres": [{}]}, specs=[good]), "policy 0 spec: unknown field")
    refused(cnp(spec=good, specs=[good, {"endpointSelector": WEB_SEL, "egres": []}]),
            "policy 0 specs[1]: unknown field 'egres'")


# -- 2. namespaces --------------------------------------------------------------------------------


def selected(data: Any) -> set[int]:
    rules = parse_rules(data)
    return {n for n, labels in SUBJECTS.items() if any(r.selector.matches(labels) for r in rules)}


def test_a_cnp_without_a_namespace_selects_endpoints_of_namespace_default() -> None:
    """An endpoint without a namespace label is in namespace default, so plain Docker containers are
    protected by a CNP that names no namespace (one that selected nothing would leave them open)."""
    doc = cnp(spec={"endpointSelector": {}, "ingress": [{}]})
    assert selected(doc) == {WEB, DB, DB_DEFAULT_LABELLED}
    assert selected(cnp("default", spec={"endpointSelector": {}, "ingress": [{}]})) == {WEB, DB, DB_DEFAULT_LABELLED}
    assert selected(cnp("prod", spec={"endpointSelector": {}, "ingress": [{}]})) == {WEB_PROD, DB_PROD}
    assert selected(cnp("prod", spec={"endpointSelector": DB_SEL, "ingress": [{}]})) == {DB_PROD}
    assert enforcement(WEB, IDENTITIES[WEB], parse_rules(doc), "default").ingress
    assert not enforcement(WEB_PROD, IDENTITIES[WEB_PROD], parse_rules(doc), "default").ingress


def test_a_cnp_s_peers_are_endpoints_of_its_namespace() -> None:
    doc = cnp("prod", spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{}]}]})
    assert admitted(doc, WEB_PROD) == {WEB_PROD, DB_PROD}  # not the host, world, init, other namespaces
    doc = cnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]})
    assert admitted(doc, WEB) == {DB, DB_DEFAULT_LABELLED}
    doc = cnp(spec={"endpointSelector": WEB_SEL, "egress": [{"toEndpoints": [{}], "toPorts": P80}]})
    assert admitted(doc, WEB, egress=True) == {WEB, DB, DB_DEFAULT_LABELLED}


@pytest.mark.parametrize(("peer", "expected"), [
    ({"matchLabels": {f"k8s:{NS}": "prod"}}, {WEB_PROD, DB_PROD}),
    ({"matchLabels": {NS: "prod", "app": "db"}}, {DB_PROD}),
    ({"matchLabels": {f"any:{NS}": "other"}}, {DB_OTHER}),
    ({"matchLabels": {f"k8s:{NS}": "default"}}, {WEB, DB, DB_DEFAULT_LABELLED}),  # unlabelled ones included
    ({"matchExpressions": [{"key": f"k8s:{NS}", "operator": "In", "values": ["prod", "other"]}]},
     {WEB_PROD, DB_PROD, DB_OTHER}),
    ({"matchExpressions": [{"key": f"k8s:{NS}", "operator": "NotIn", "values": ["prod"]}]},
     {WEB, DB, DB_OTHER, DB_DEFAULT_LABELLED}),
    ({"matchExpressions": [{"key": f"k8s:{NS}", "operator": "Exists"}]}, ENDPOINTS),
])
def test_a_peer_selector_that_names_the_namespace_selects_that_namespace(peer: dict[str, Any],
                                                                        expected: set[int]) -> None:
    doc = cnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [peer]}]})
    assert admitted(doc, WEB) == expected


def test_requires_in_a_cnp_are_namespaced_too() -> None:
    doc = cnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromRequires": [{"matchLabels": {"env": "prod"}}]},
                                                             {"fromEntities": ["all"]}]})
    assert admitted(doc, WEB) == {DB}  # DB_PROD has env=prod but lives in prod


def test_a_clusterwide_wildcard_is_every_endpoint_and_nothing_reserved() -> None:
    doc = ccnp(spec={"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]})
    assert selected(doc) == ENDPOINTS  # not init either: reserved:init must be named
    assert admitted(doc, DB_OTHER) == ENDPOINTS
    init_rule = ccnp(spec={"endpointSelector": {"matchLabels": {"reserved:init": ""}},
                           "egress": [{"toEntities": ["host"]}]})
    assert selected(init_rule) == {ids.INIT}


def test_a_plain_rule_is_not_namespaced() -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]}]
    assert selected(doc) == {WEB, WEB_PROD}
    assert admitted(doc, WEB_PROD) == {DB, DB_PROD, DB_OTHER, DB_DEFAULT_LABELLED}
    # the namespace label is an ordinary label there: only endpoints that carry it have it
    doc = [{"endpointSelector": {"matchLabels": {NS: "default"}}, "ingress": [{}]}]
    assert selected(doc) == {DB_DEFAULT_LABELLED}


@pytest.mark.parametrize(("doc", "fragments"), [
    (cnp(spec={"endpointSelector": {"matchLabels": {f"k8s:{NS}": "prod"}}, "ingress": [{}]}),
     ["policy 0 spec: endpointSelector", "namespace 'default'", "CiliumClusterwideNetworkPolicy"]),
    (cnp("prod", spec={"endpointSelector": {"matchExpressions": [{"key": NS, "operator": "DoesNotExist"}]},
                       "ingress": [{}]}), ["namespace 'prod'"]),
    (cnp(spec={"endpointSelector": {"matchLabels": {"reserved:init": ""}}, "ingress": [{}]}),
     ["reserved:init", "CiliumClusterwideNetworkPolicy"]),
    (cnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]}),
     ["ingress[0].fromEndpoints[0]", "reserved:host", "fromEntities"]),
    (ccnp(spec={"endpointSelector": WEB_SEL, "egress": [{"toEndpoints": [{"matchExpressions": [
        {"key": "reserved:world", "operator": "Exists"}]}]}]}), ["egress[0].toEndpoints[0]", "toEntities"]),
    (cnp(spec={"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}}]}]}), ["namespace labels"]),
    (ccnp(metadata={"name": "p", "namespace": "prod"}, spec={"endpointSelector": {}, "ingress": [{}]}),
     ["policy 0: metadata.namespace", "clusterwide"]),
    (cnp("Prod_1", spec={"endpointSelector": {}, "ingress": [{}]}), ["metadata.namespace", "'Prod_1'"]),
    (cnp(metadata={"name": "p", "namespace": 7}, spec={"endpointSelector": {}, "ingress": [{}]}),
     ["metadata.namespace"]),
])
def test_namespaced_selectors_that_cannot_mean_what_they_say_are_refused(doc: dict[str, Any],
                                                                         fragments: list[str]) -> None:
    refused(doc, *fragments)


def test_a_cnp_may_name_its_own_namespace() -> None:
    doc = cnp("prod", spec={"endpointSelector": {"matchLabels": {f"k8s:{NS}": "prod", "app": "db"}},
                            "ingress": [{}]})
    assert selected(doc) == {DB_PROD}


def test_the_namespace_is_kept_in_the_rule_its_labels_and_the_store() -> None:
    """Two CNPs of one name in two namespaces are two policies; a restarted agent keeps the scope."""
    store = MemoryStore()
    repo = Repository(store)
    repo.add(parse_rules([cnp("prod", spec={"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}),
                          cnp(spec={"endpointSelector": {}, "ingress": [{"fromEndpoints": [DB_SEL]}]})]))
    assert [(r.kind, r.namespace) for r in repo.rules] == [("CiliumNetworkPolicy", "prod"),
                                                          ("CiliumNetworkPolicy", "default")]
    assert [r.name for r in repo.rules] == ["name=p,namespace=prod", "name=p,namespace=default"]
    before = compile_all(SUBJECTS, repo.rules, IDENTITIES)
    reborn = Repository(store)
    assert [(r.kind, r.namespace) for r in reborn.rules] == [(r.kind, r.namespace) for r in repo.rules]
    assert compile_all(SUBJECTS, reborn.rules, IDENTITIES) == before
    # what `policy get` shows can be imported again with the same meaning
    again = [r.numbered(x.id) for r, x in zip(parse_rules([x.document for x in repo.rules]), repo.rules,
                                               strict=True)]
    assert compile_all(SUBJECTS, again, IDENTITIES) == before
    assert repo.rules[0].document["metadata"] == {"namespace": "prod"}


def test_identical_unlabelled_rules_of_two_namespaces_are_both_kept() -> None:
    spec = {"endpointSelector": {}, "ingress": [{}]}
    repo = Repository()
    repo.add(parse_rules([{"kind": "CiliumNetworkPolicy", "metadata": {"namespace": ns}, "spec": spec}
                          for ns in ("a", "b")] + [spec]))
    assert len(repo.rules) == 3


# -- `{}` is never a reserved entity ----------------------------------------------------------------


def test_a_wildcard_peer_in_a_plain_rule_admits_endpoints_not_reserved_identities() -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{}]}]}]
    assert admitted(doc, WEB) == ENDPOINTS
    doc = [{"endpointSelector": WEB_SEL, "egress": [{"toEndpoints": [{"matchLabels": {}}]}]}]
    assert admitted(doc, WEB, egress=True) == ENDPOINTS
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [
        {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}]}]}]
    assert admitted(doc, WEB) == set()  # every endpoint has app; host and world are no endpoints


def test_entities_and_port_only_entries_still_name_everyone() -> None:
    assert admitted([{"endpointSelector": WEB_SEL, "ingress": [{"fromEntities": ["all"]}]}], WEB) == set(IDENTITIES)
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"toPorts": P80}]}]
    assert admitted(doc, WEB) == set(IDENTITIES)
    assert len([k for k in compiled(doc) if k.subject == WEB]) == 2  # one wildcard entry each way, however many
    # identities exist
    host = [{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]}]
    assert admitted(host, WEB) == {ids.HOST}  # a plain rule may name a reserved label explicitly


def test_a_wildcard_requirement_denies_reserved_peers() -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"fromRequires": [{}]}, {"fromEntities": ["all"]}]}]
    assert admitted(doc, WEB) == ENDPOINTS


def test_a_wildcard_subject_is_every_endpoint_but_not_init() -> None:
    assert selected([{"endpointSelector": {}, "ingress": [{}]}]) == ENDPOINTS
    assert selected([{"endpointSelector": {"matchLabels": {"reserved:init": ""}}, "ingress": [{}]}]) == {ids.INIT}


# -- 3. empty lists select nothing (Cilium >= 1.15) -------------------------------------------------


@pytest.mark.parametrize("entry", [
    {"fromEndpoints": []},
    {"fromEndpoints": [], "toPorts": P80},
    {"fromEntities": []},
    {"fromEntities": [], "toPorts": P80},
    {"fromEndpoints": [], "fromRequires": [DB_SEL]},
])
def test_an_empty_peer_list_selects_nothing_and_still_enforces(entry: dict[str, Any]) -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingress": [entry]}]
    assert admitted(doc, WEB) == set()
    assert enforcement(WEB, IDENTITIES[WEB], parse_rules(doc), "default").ingress
    rules = numbered(doc)
    lines = trace(rules, IDENTITIES, "default", Party(DB, IDENTITIES[DB], True), Party(WEB, IDENTITIES[WEB], True),
                  TCP, 80).lines
    assert any("from no one" in x for x in lines), lines


@pytest.mark.parametrize("entry", [{"toEndpoints": []}, {"toEntities": [], "toPorts": P80}])
def test_an_empty_egress_peer_list_selects_nothing(entry: dict[str, Any]) -> None:
    doc = [{"endpointSelector": WEB_SEL, "egress": [entry]}]
    assert admitted(doc, WEB, egress=True) == set()


def test_an_empty_deny_list_denies_nothing_but_turns_default_deny_on() -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingressDeny": [{"fromEndpoints": [], "toPorts": P80}]},
           {"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]}]
    assert admitted(doc, WEB) == {DB, DB_PROD, DB_OTHER, DB_DEFAULT_LABELLED}
    assert not any(v.deny for v in compiled(doc).values())
    assert enforcement(WEB, IDENTITIES[WEB], parse_rules(doc[:1]), "default").ingress


def test_an_empty_requires_list_requires_nothing() -> None:
    doc = [{"endpointSelector": WEB_SEL, "ingress": [{"fromRequires": []}, {"fromEntities": ["all"]}]}]
    assert admitted(doc, WEB) == set(IDENTITIES)


@pytest.mark.parametrize(("rule", "fragments"), [
    ({"ingress": [{"fromEndpoints": [DB_SEL], "toPorts": []}]}, ["ingress[0].toPorts", "empty list", "every port"]),
    ({"ingress": [], "egress": [{}]}, ["ingress: an empty list", "ingress: [{}]"]),
    ({"egress": []}, ["egress: an empty list", "egress: [{}]"]),
    ({"ingressDeny": []}, ["rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"]),
])
def test_empty_lists_that_would_read_as_everything_or_nothing_are_refused(rule: dict[str, Any],
                                                                          fragments: list[str]) -> None:
    refused([{"endpointSelector": WEB_SEL, **rule}], "rule 0", *fragments)


# -- 4. subjects nothing enforces, host policies, rules without sections ----------------------------


@pytest.mark.parametrize("name", ["host", "world", "health", "remote-node", "unmanaged", "ingress",
                                  "kube-apiserver", "world-ipv4"])
def test_a_subject_that_is_a_reserved_identity_is_refused(name: str) -> None:
    text = refused([{"endpointSelector": {"matchLabels": {f"reserved:{name}": ""}}, "ingress": [{}]}],
                   "rule 0: endpointSelector", f"reserved:{name}")
    assert "not supported" in text or "not enforce" in text
    refused([{"endpointSelector": {"matchExpressions": [{"key": f"reserved:{name}", "operator": "Exists"}]},
              "egress": [{}]}], f"reserved:{name}")


def test_the_host_as_subject_names_host_policies() -> None:
    refused([{"endpointSelector": {"matchLabels": {"reserved:host": ""}}, "ingress": [{}]}], "host polic")


def test_reserved_init_and_negative_reserved_keys_are_fine_subjects() -> None:
    parse_rules([{"endpointSelector": {"matchLabels": {"reserved:init": ""}}, "ingress": [{}]},
                 {"endpointSelector": {"matchExpressions": [{"key": "reserved:host", "operator": "DoesNotExist"}]},
                  "ingress": [{}]}])


def test_node_selectors_are_host_policies_which_are_not_supported_yet() -> None:
    text = refused([{"nodeSelector": {}, "ingress": [{}]}], "rule 0: nodeSelector",
                   "host policies (nodeSelector) are not supported yet")
    assert "unknown field" not in text
    refused(cnp(spec={"endpointSelector": {}, "nodeSelector": {}, "ingress": [{}]}), "policy 0 spec: nodeSelector")


@pytest.mark.parametrize("rule", [
    {"endpointSelector": WEB_SEL},
    {"endpointSelector": WEB_SEL, "enableDefaultDeny": {"ingress": True}},
    {"endpointSelector": WEB_SEL, "labels": ["name=x"], "description": "nothing"},
    {"endpointSelector": WEB_SEL, "ingress": None},
])
def test_a_rule_without_any_section_is_refused_as_cilium_does(rule: dict[str, Any]) -> None:
    refused([rule], "rule 0: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny")


def test_policy_logging_is_named_as_not_supported() -> None:
    refused([{"endpointSelector": WEB_SEL, "ingress": [{}], "log": {"value": "x"}}], "rule 0: log",
            "not supported yet")


def test_stored_rules_that_would_be_refused_today_still_load_as_they_were_enforced() -> None:
    """An older agent accepted them; dropping one on restart could open what it closed."""
    store = MemoryStore()
    store.put("policy", {"version": 2, "kind": "policy", "revision": 3, "next_id": 4, "rules": [
        {"id": 1, "spec": {"endpointSelector": WEB_SEL, "enableDefaultDeny": {"ingress": True}}},
        {"id": 2, "spec": {"endpointSelector": {"matchLabels": {"reserved:host": ""}}, "ingress": []}},
        {"id": 3, "spec": {"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL], "toPorts": []}]}},
    ]})
    repo = Repository(store)
    assert [r.id for r in repo.rules] == [1, 2, 3]
    assert not any(repo.rules[1].selector.matches(labels) for labels in SUBJECTS.values())  # a no-op, as it was
    entries = compile_all(SUBJECTS, repo.rules, IDENTITIES)
    assert decide(entries, WEB, False, DB, 17, 53).allowed  # every port, as it was
    assert not decide(entries, WEB, False, ids.HOST, TCP, 80).allowed


# -- 6. hostile input ------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 50_000])
def test_deeply_nested_input_is_refused_with_a_message(depth: int) -> None:
    rule = {"endpointSelector": WEB_SEL, "ingress": [{}], "description": nested(depth)}
    refused([rule], "nested too deeply", f"{MAX_DEPTH} levels")


def test_a_deeply_nested_cycle_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    refused([{"endpointSelector": WEB_SEL, "ingress": loop}], "nested too deeply")


def test_too_many_values_are_refused() -> None:
    refused([{"endpointSelector": WEB_SEL, "ingress": [{}], "description": ["x"] * MAX_NODES}], "too large",
            str(MAX_NODES))


def test_shared_values_count_each_time_they_appear() -> None:
    """YAML aliases become shared objects; what counts is the expanded size."""
    leaf: Any = ["x"] * 10
    for _ in range(8):
        leaf = [leaf] * 10
    refused([{"endpointSelector": WEB_SEL, "ingress": [{}], "description": leaf}], "too large")


def test_a_realistic_large_policy_is_within_the_bounds() -> None:
    rules = [{"labels": [{"key": "name", "value": f"r{i}"}], "endpointSelector": {"matchLabels": {"app": f"e{i}"}},
              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": f"e{i + 1}"}}], "toPorts": P80}]}
             for i in range(5000)]
    assert len(json.dumps({"rules": rules})) < 1 << 21
    assert len(parse_rules(rules)) == 5000
