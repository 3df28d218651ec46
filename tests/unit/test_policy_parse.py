"""datapath.policy: the strict rule parser (table-driven error paths), the CRD wrapper, the Repository."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from datapath.errors import InvalidRequest, NotFound, StateError
from datapath.labels import Label
from datapath.policy import MAX_PORTS, PeerRule, PortRange, Repository, Rule, parse_rule, parse_rules
from datapath.store import MemoryStore

SEL = {"matchLabels": {"app": "web"}}
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1


SECTIONS = ("ingress", "egress", "ingressDeny", "egressDeny")


def rule(**fields: Any) -> dict[str, Any]:
    """A rule selecting SEL; one without a section gets `egress: [{}]` (a rule needs one, as Cilium's)."""
    section = {} if any(k in fields for k in SECTIONS) else {"egress": [{}]}
    return {"endpointSelector": SEL, **section, **fields}


def ingress_ports(*ports: dict[str, Any]) -> dict[str, Any]:
    return rule(ingress=[{"toPorts": [{"ports": list(ports)}]}])


# -- what valid rules become ------------------------------------------------------------------


def test_l3_l4_rule() -> None:
    [r] = parse_rules([{
        "labels": [{"key": "name", "value": "l3-l4"}],
        "description": "web from app2 on 80",
        "endpointSelector": {"matchLabels": {"id": "app1"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"id": "app2"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
    }])
    assert r.labels == (Label("unspec", "name", "l3-l4"),) and r.description == "web from app2 on 80"
    assert r.egress == r.ingress_deny == r.egress_deny == ()
    [pr] = r.ingress
    assert [s.text for s in pr.endpoints] == ['{"matchLabels":{"id":"app2"}}']
    assert pr.ports == (PortRange(TCP, 80, 80),) and pr.has_l3 and pr.requires == () and pr.entities == ()
    assert json.loads(r.raw)["labels"] == [{"key": "name", "value": "l3-l4"}]
    assert r.id == 0 and r.name == "name=l3-l4"


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"port": "80", "protocol": "TCP"}, [PortRange(TCP, 80, 80)]),
        ({"port": 80, "protocol": "tcp"}, [PortRange(TCP, 80, 80)]),  # YAML number, any case
        ({"port": "53", "protocol": "UDP"}, [PortRange(UDP, 53, 53)]),
        ({"port": "80"}, [PortRange(TCP, 80, 80), PortRange(UDP, 80, 80), PortRange(SCTP, 80, 80)]),  # ANY
        ({"port": "80", "protocol": "ANY"}, [PortRange(TCP, 80, 80), PortRange(UDP, 80, 80), PortRange(SCTP, 80, 80)]),
        ({"port": "8000", "endPort": 8080, "protocol": "TCP"}, [PortRange(TCP, 8000, 8080)]),
        ({"port": "8000", "endPort": 8000, "protocol": "TCP"}, [PortRange(TCP, 8000, 8000)]),
        ({"port": "8000", "endPort": 0, "protocol": "TCP"}, [PortRange(TCP, 8000, 8000)]),
        ({"port": "65535", "protocol": "UDP"}, [PortRange(UDP, 65535, 65535)]),
        ({"port": "0", "protocol": "TCP"}, [PortRange(TCP, 0, 0)]),  # every TCP port
        ({"protocol": "UDP"}, [PortRange(UDP, 0, 0)]),
        ({"protocol": "ANY"}, [PortRange(0, 0, 0)]),  # anything at all
        ({"port": "8", "protocol": "ICMP"}, [PortRange(ICMP, 8, 8)]),  # ICMP: the type
        ({"port": "128", "protocol": "ICMPv6"}, [PortRange(58, 128, 128)]),
    ],
)
def test_ports(port: dict[str, Any], expected: list[PortRange]) -> None:
    [r] = parse_rules(ingress_ports(port))
    assert list(r.ingress[0].ports) == expected


def test_port_range_text() -> None:
    assert [str(p) for p in (PortRange(TCP, 80, 80), PortRange(UDP, 1, 1023), PortRange(TCP, 0, 0),
                             PortRange(0, 0, 0))] == ["80/TCP", "1-1023/UDP", "TCP", "ANY"]


def test_entities_requires_and_deny_sections() -> None:
    [r] = parse_rules(rule(
        ingress=[{"fromEntities": ["host", "world"]}, {"fromRequires": [{"matchLabels": {"env": "prod"}}]}],
        egress=[{}, {"toEntities": ["all"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}],
        ingressDeny=[{"fromEndpoints": [{"matchLabels": {"app": "evil"}}]}],
        egressDeny=[{"toPorts": [{"ports": [{"port": "25", "protocol": "TCP"}]}]}],
    ))
    assert r.ingress[0].entities == ("host", "world") and r.ingress[0].has_l3
    assert len(r.ingress[1].requires) == 1 and not r.ingress[1].has_l3
    assert r.egress[0] == PeerRule()  # egress: [{}] = deny all egress
    assert r.egress[1].entities == ("all",) and r.egress[1].ports == (PortRange(UDP, 53, 53),)
    assert r.ingress_deny[0].endpoints[0].matches(frozenset({Label("container", "app", "evil")}))
    assert r.egress_deny[0].ports == (PortRange(TCP, 25, 25),) and not r.egress_deny[0].has_l3


def test_rule_labels_as_objects_or_strings_are_sorted() -> None:
    [r] = parse_rules(rule(labels=["team=b", {"key": "name", "value": "x", "source": "k8s"}, {"key": "flag"}]))
    assert r.labels == (Label("k8s", "name", "x"), Label("unspec", "flag", ""), Label("unspec", "team", "b"))
    assert r.name == "name=x,flag=,team=b"


def test_yaml_policy_as_data() -> None:
    text = """
- endpointSelector:
    matchLabels: {app: web}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: frontend}
      toPorts:
        - ports:
            - port: 8080
              endPort: 8090
              protocol: TCP
  egress:
    - toEntities: [world]
- endpointSelector: {}
  ingressDeny:
    - fromEntities: [world]
"""
    data = yaml.safe_load(text)
    assert isinstance(data[0]["ingress"][0]["toPorts"][0]["ports"][0]["port"], int)
    first, second = parse_rules(data)
    assert first.ingress[0].ports == (PortRange(TCP, 8080, 8090),)
    assert first.egress[0].entities == ("world",)
    assert second.selector.wildcard and second.ingress_deny[0].entities == ("world",)


def test_a_single_rule_object_is_a_list_of_one() -> None:
    assert len(parse_rules(rule())) == 1


# -- the CRD wrapper --------------------------------------------------------------------------


def crd(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "allow-web"}, **fields}


def test_crd_spec_is_labelled_with_its_name_and_namespace() -> None:
    [r] = parse_rules(crd(spec=rule(ingress=[{"fromEntities": ["host"]}])))
    assert r.labels == (Label("unspec", "name", "allow-web"), Label("unspec", "namespace", "default"))
    assert r.ingress[0].entities == ("host",)
    assert (r.kind, r.namespace) == ("CiliumNetworkPolicy", "default")


def test_crd_specs_and_own_labels() -> None:
    rules = parse_rules([crd(specs=[rule(), rule(labels=["own=1"])]),
                         {"kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "cw"}, "spec": rule()},
                         {"kind": "CiliumClusterwideNetworkPolicy", "spec": rule(egress=[{}])}])
    named = (Label("unspec", "name", "allow-web"), Label("unspec", "namespace", "default"))
    assert [r.labels for r in rules] == [named, (Label("unspec", "own", "1"),), (Label("unspec", "name", "cw"),), ()]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (crd(spec=rule(), status={}), "policy 0: unknown field 'status'"),
        (crd(kind="NetworkPolicy", spec=rule()), "policy 0: unsupported kind 'NetworkPolicy'"),
        (crd(spec=rule(ingres=[])), "policy 0 spec: unknown field 'ingres'"),
        (crd(specs=[rule(), {"ingress": []}]), "policy 0 specs[1]: endpointSelector is required"),
        (crd(metadata="allow-web", spec=rule()), "policy 0: metadata must be an object"),
        (crd(metadata={"name": ["x"]}, spec=rule()), "policy 0: metadata must be an object with a string name"),
    ],
)
def test_bad_crds(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules(doc)
    assert message in str(err.value)


# -- every error names the rule and the field -------------------------------------------------

FORTY_ONE = [{"port": str(p), "protocol": "TCP"} for p in range(1, MAX_PORTS + 2)]

ERRORS = [
    # (rules, the rule index, fragments of the message)
    ([rule(ingres=[])], 0, ["unknown field 'ingres'", "did you mean 'ingress'"]),
    ([rule(), rule(Egress=[])], 1, ["unknown field 'Egress'", "did you mean 'egress'"]),
    ([rule(), rule(), rule(endpointselector=SEL)], 2, ["unknown field 'endpointselector'",
                                                       "did you mean 'endpointSelector'"]),
    ([rule(), {"ingress": []}], 1, ["endpointSelector is required"]),
    ([{"endpointSelector": None}], 0, ["endpointSelector is required"]),
    ([rule(endpointSelector=[])], 0, ["endpointSelector: a selector must be an object"]),
    (["rule"], 0, ["must be an object"]),
    ([rule(ingress={"fromEndpoints": [SEL]})], 0, ["ingress must be a list"]),
    ([rule(ingress=["x"])], 0, ["ingress[0]: must be an object"]),
    ([rule(ingress=[{"fromEndpoint": [SEL]}])], 0, ["ingress[0]: unknown field 'fromEndpoint'",
                                                    "did you mean 'fromEndpoints'"]),
    ([rule(ingress=[{"toEndpoints": [SEL]}])], 0, ["ingress[0]: unknown field 'toEndpoints'"]),
    ([rule(egress=[{"fromEndpoints": [SEL]}])], 0, ["egress[0]: unknown field 'fromEndpoints'"]),
    ([rule(ingress=[{"fromEndpoints": SEL}])], 0, ["ingress[0].fromEndpoints: must be a list"]),
    ([rule(ingress=[{"fromEndpoints": [{"matchLabel": {}}]}])], 0,
     ["ingress[0].fromEndpoints[0]: unknown field 'matchLabel'"]),
    ([rule(egress=[{}, {"toRequires": [{"matchExpressions": [{"key": "a", "operator": "Has"}]}]}])], 0,
     ["egress[1].toRequires[0].matchExpressions[0].operator"]),
    # ports
    ([ingress_ports({"port": "http"})], 0, ["ingress[0].toPorts[0].ports[0].port", "named ports"]),
    ([ingress_ports({"port": "-1"})], 0, ["ports[0].port"]),
    ([ingress_ports({"port": "²"})], 0, ["ports[0].port", "is not a port number"]),  # isdigit() but not int()
    ([ingress_ports({"port": " 80"})], 0, ["ports[0].port"]),
    ([ingress_ports({"port": "70000"})], 0, ["ports[0].port: must be between 1 and 65535"]),
    ([ingress_ports({"port": 65536, "protocol": "TCP"})], 0, ["ports[0].port: must be between 1 and 65535"]),
    ([ingress_ports({"port": -5, "protocol": "TCP"})], 0, ["ports[0].port"]),
    ([ingress_ports({"port": 80.5})], 0, ["ports[0].port: must be a number"]),
    ([ingress_ports({"port": True})], 0, ["ports[0].port: must be a number"]),
    ([ingress_ports({"port": "256", "protocol": "ICMP"})], 0, ["ports[0].port: must be between 1 and 255"]),
    ([ingress_ports({"port": "80", "endPort": 79})], 0, ["ports[0].endPort: must be between port (80)"]),
    ([ingress_ports({"port": "80", "endPort": 65536})], 0, ["ports[0].endPort"]),
    ([ingress_ports({"port": "80", "endPort": "90"})], 0, ["ports[0].endPort"]),
    ([ingress_ports({"endPort": 90, "protocol": "TCP"})], 0, ["ports[0].endPort"]),  # a range needs a start
    ([ingress_ports({"port": "80", "protocol": "XTP"})], 0, ["ports[0].protocol: must be one of"]),
    ([ingress_ports({"port": "80", "protocl": "TCP"})], 0, ["ports[0]: unknown field 'protocl'",
                                                            "did you mean 'protocol'"]),
    ([rule(ingress=[{"toPorts": [{"ports": FORTY_ONE}]}])], 0, ["ingress[0].toPorts[0].ports: at most 40 ports"]),
    ([rule(ingress=[{"toPorts": [{"ports": []}]}])], 0, ["toPorts[0].ports: must be a non-empty list"]),
    ([rule(ingress=[{"toPorts": [{}]}])], 0, ["toPorts[0].ports: must be a non-empty list"]),
    ([rule(ingress=[{"toPorts": {"ports": []}}])], 0, ["ingress[0].toPorts: must be a list"]),
    ([rule(ingress=[{"toPorts": ["80"]}])], 0, ["toPorts[0]: must be an object"]),
    ([rule(ingress=[{"toPorts": [{"ports": ["80"]}]}])], 0, ["toPorts[0].ports[0]: must be an object"]),
    ([rule(ingress=[{"toPorts": [{"port": [{"port": "80"}]}]}])], 0, ["toPorts[0]: unknown field 'port'"]),
    # L7 and other features that are not there yet
    ([rule(ingress=[{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}])], 0,
     ["ingress[0].toPorts[0].ports[0]", "L7 rules need protocol TCP"]),  # no protocol is ANY
    ([rule(egress=[{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}])], 0,
     ["egress[0].toPorts[0].rules", "not supported yet"]),
    ([rule(ingress=[{"toPorts": [{"ports": [{"port": "443"}], "terminatingTLS": {}}]}])], 0,
     ["toPorts[0]", "TLS", "not supported yet"]),
    # CIDR rules (tests/unit/test_cidr_policy.py has the rest)
    ([rule(egress=[{"toCIDR": ["20.1.1.300/32"]}])], 0, ["egress[0].toCIDR[0]", "is not a CIDR"]),
    ([rule(egress=[{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}])], 0,
     ["egress[0].toCIDRSet[0].except[0]: 11.0.0.0/16 is not inside the cidr 10.0.0.0/8"]),
    ([rule(ingress=[{"fromCIDR": ["10.0.0.0/8"], "fromEntities": ["world"]}])], 0,
     ["ingress[0]: combining fromEntities and fromCIDR is not supported"]),
    ([rule(ingress=[{"fromCIDRSet": [{"cidrGroupRef": "g"}]}])], 0, ["ingress[0].fromCIDRSet[0].cidrGroupRef"]),
    ([rule(egress=[{"toFQDNs": [{"matchName": "example.com"}]}])], 0, ["egress[0]: toFQDNs: FQDN rules"]),
    ([rule(egress=[{"toServices": [{"k8sServiceSelector": {"selector": {"matchLabels": {"a": "b"}}}}]}])], 0,
     ["egress[0].toServices[0].k8sServiceSelector: selecting services by their labels is not supported"]),
    ([rule(egressDeny=[{"toCIDR": "1.1.1.1/32"}])], 0, ["egressDeny[0].toCIDR: must be a list of CIDRs"]),
    ([rule(ingress=[{"icmps": [{"fields": [{"type": 8}]}]}])], 0, ["ingress[0]: icmps", "not supported yet"]),
    # requires, entities, combinations
    ([rule(ingressDeny=[{"fromRequires": [SEL]}])], 0, ["ingressDeny[0]: fromRequires is not allowed in a deny rule"]),
    ([rule(egressDeny=[{"toRequires": [SEL]}])], 0, ["egressDeny[0]: toRequires is not allowed in a deny rule"]),
    ([rule(ingress=[{"fromEndpoints": [SEL], "fromEntities": ["world"]}])], 0,
     ["ingress[0]: combining fromEndpoints and fromEntities is not supported"]),
    ([rule(egress=[{"toEndpoints": [], "toEntities": []}])], 0, ["egress[0]: combining toEndpoints and toEntities"]),
    ([rule(ingress=[{"fromEntities": ["wrld"]}])], 0, ["ingress[0].fromEntities: unknown entity 'wrld'",
                                                       "known: host, world, all, init"]),
    ([rule(egress=[{"toEntities": ["kube-apiserver"]}])], 0, ["egress[0].toEntities: unknown entity"]),
    ([rule(ingress=[{"fromEntities": "world"}])], 0, ["ingress[0].fromEntities: must be a list"]),
    ([rule(ingress=[{"fromEntities": [["world"]]}])], 0, ["ingress[0].fromEntities: unknown entity"]),
    # labels and description
    ([rule(labels="name=x")], 0, ["labels must be a list"]),
    ([rule(labels=[{"value": "x"}])], 0, ["labels[0].key is required"]),
    ([rule(labels=[{"key": "a", "src": "k8s"}])], 0, ["labels[0]: unknown field 'src'"]),
    ([rule(labels=[3])], 0, ["labels[0] must be an object or 'key=value'"]),
    ([rule(labels=["=x"])], 0, ["labels[0]", "empty key"]),
    ([rule(description=["x"])], 0, ["description must be a string"]),
]


@pytest.mark.parametrize(("rules", "index", "fragments"), ERRORS)
def test_errors_name_the_rule_and_the_field(rules: list[Any], index: int, fragments: list[str]) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules(rules)
    text = str(err.value)
    assert text.startswith(f"rule {index}: ") or text.startswith(f"rule {index}:"), text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize("data", [[], None, {}])
def test_nothing_to_parse(data: Any) -> None:
    with pytest.raises(InvalidRequest):
        parse_rules(data)


def test_parse_rule_uses_the_given_place() -> None:
    with pytest.raises(InvalidRequest, match=r"^stored rule 7: unknown field 'x'$"):
        parse_rule({"endpointSelector": {}, "x": 1}, "stored rule 7")


# -- the repository ---------------------------------------------------------------------------


def rules_of(*docs: dict[str, Any]) -> list[Rule]:
    return parse_rules(list(docs))


A = rule(labels=["name=a"], ingress=[{"fromEntities": ["host"]}])
A2 = rule(labels=["name=a"], ingress=[{"fromEntities": ["world"]}])
B = rule(labels=["name=b", "team=x"], egress=[{}])
C = rule(labels=["name=c", "team=x"], egress=[{"toEntities": ["all"]}])
PLAIN = rule(ingress=[{}])


def shape(repo: Repository) -> list[tuple[int, str]]:
    return [(r.id, r.raw) for r in repo.rules]


def test_add_assigns_ids_and_revisions() -> None:
    repo = Repository()
    assert (repo.revision, repo.rules) == (0, [])
    assert repo.add(rules_of(A, B)) == 1
    assert repo.add(rules_of(C)) == 2
    assert [r.id for r in repo.rules] == [1, 2, 3]
    assert [r.name for r in repo.rules] == ["name=a", "name=b,team=x", "name=c,team=x"]
    assert repo.snapshot() == (2, repo.rules)


def test_a_rule_with_the_same_labels_replaces_the_old_one() -> None:
    repo = Repository()
    repo.add(rules_of(A, B))
    repo.add(rules_of(A2))
    assert [(r.id, r.ingress[0].entities) for r in repo.rules if r.labels[0].value == "a"] == [(3, ("world",))]
    assert len(repo.rules) == 2 and repo.revision == 2


def test_rules_of_one_import_never_replace_each_other() -> None:
    """A CRD with several specs labels them all with its name; all of them are in force."""
    repo = Repository()
    repo.add(parse_rules(crd(specs=[rule(ingress=[{"fromEntities": ["host"]}]), rule(egress=[{}])])))
    assert len(repo.rules) == 2
    repo.add(parse_rules(crd(specs=[rule(ingress=[{"fromEntities": ["world"]}]), rule(egress=[{}]),
                                    rule(ingressDeny=[{}])])))
    assert [r.id for r in repo.rules] == [3, 4, 5]  # the three new specs replaced the two old ones
    assert repo.rules[0].ingress[0].entities == ("world",)


def test_an_identical_unlabelled_rule_is_not_added_twice() -> None:
    repo = Repository()
    repo.add(rules_of(PLAIN))
    assert repo.add(rules_of(PLAIN, PLAIN)) == 2  # still a new revision
    assert len(repo.rules) == 1
    repo.add(rules_of(rule(ingress=[{}], description="other")))
    assert len(repo.rules) == 2


def test_select_by_labels() -> None:
    repo = Repository()
    repo.add(rules_of(A, B, C, PLAIN))
    names = [r.name for r in repo.select([Label("unspec", "team", "x")])]
    assert names == ["name=b,team=x", "name=c,team=x"]
    assert [r.name for r in repo.select([Label("unspec", "team", "x"), Label("unspec", "name", "c")])] == [
        "name=c,team=x"]
    assert [r.name for r in repo.select([Label("any", "name", "a")])] == ["name=a"]
    assert repo.select([Label("k8s", "name", "a")]) == []  # a source given must match
    assert repo.select([Label("unspec", "team", "y")]) == []
    assert len(repo.select(None)) == len(repo.select([])) == 4


def test_delete_by_labels_and_all() -> None:
    repo = Repository()
    repo.add(rules_of(A, B, C, PLAIN))
    assert repo.delete([Label("unspec", "team", "x")]) == (2, 2)
    assert [r.name for r in repo.rules] == ["name=a", "rule 4"]
    assert repo.delete(None) == (3, 2)
    assert repo.rules == [] and repo.delete(None) == (4, 0)


@pytest.mark.parametrize("labels", [[Label("unspec", "team", "nope")], []])
def test_a_delete_that_matches_nothing_or_names_nothing_changes_nothing(labels: list[Label]) -> None:
    repo = Repository()
    repo.add(rules_of(A, B))
    before = (repo.revision, shape(repo))
    with pytest.raises((NotFound, InvalidRequest)):
        repo.delete(labels)
    assert (repo.revision, shape(repo)) == before


def test_a_failed_parse_leaves_the_repository_unchanged() -> None:
    repo = Repository()
    repo.add(rules_of(A, B))
    before = (repo.revision, shape(repo))
    with pytest.raises(InvalidRequest, match="rule 1"):
        repo.add(parse_rules([A2, rule(ingress=[{"toPorts": [{"ports": [{"port": "99999"}]}]}])]))
    assert (repo.revision, shape(repo)) == before


def test_the_repository_persists_whole() -> None:
    store = MemoryStore()
    repo = Repository(store)
    repo.add(rules_of(A, B, PLAIN))
    repo.delete([Label("unspec", "name", "b")])
    reborn = Repository(store)
    assert (reborn.revision, shape(reborn)) == (2, shape(repo))
    assert reborn.rules == repo.rules
    assert reborn.add(rules_of(C)) == 3 and reborn.rules[-1].id == 4  # ids are never reused


def test_a_store_failure_changes_nothing() -> None:
    store = MemoryStore()
    repo = Repository(store)
    repo.add(rules_of(A))
    before = (repo.revision, shape(repo), json.dumps(store.docs))
    store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        repo.add(rules_of(B))
    store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        repo.delete(None)
    assert (repo.revision, shape(repo), json.dumps(store.docs)) == before


def test_a_plan_changes_nothing_until_committed() -> None:
    store = MemoryStore()
    repo = Repository(store)
    repo.add(rules_of(A))
    before = (repo.revision, shape(repo), json.dumps(store.docs))
    change = repo.plan_add(rules_of(A2, B))
    assert [r.id for r in change.rules] == [2, 3] and change.removed == 1  # A2 replaces A
    assert repo.plan_delete(None).rules == []
    assert (repo.revision, shape(repo), json.dumps(store.docs)) == before
    assert repo.commit(change) == 2 and [r.name for r in repo.rules] == ["name=a", "name=b,team=x"]


def test_a_plan_made_on_an_older_revision_is_refused() -> None:
    repo = Repository()
    stale = repo.plan_add(rules_of(A))
    repo.add(rules_of(B))
    with pytest.raises(StateError, match="changed meanwhile"):
        repo.commit(stale)
    assert [r.name for r in repo.rules] == ["name=b,team=x"]


def test_unlabelled_duplicates_are_added_once() -> None:
    repo = Repository()
    repo.add(rules_of(PLAIN, PLAIN, A))
    assert repo.plan_add(rules_of(PLAIN)).removed == 0  # skipped, and nothing in force dropped
    repo.add(rules_of(PLAIN))
    assert [r.raw for r in repo.rules].count(json.dumps(PLAIN, sort_keys=True, separators=(",", ":"))) == 1
    assert len(repo.rules) == 2


def test_a_crd_name_label_survives_a_reload() -> None:
    store = MemoryStore()
    Repository(store).add(parse_rules(crd(spec=rule(ingress=[{"fromEntities": ["host"]}]))))
    reborn = Repository(store)
    assert [r.labels for r in reborn.rules] == [(Label("unspec", "name", "allow-web"),
                                                 Label("unspec", "namespace", "default"))]
    assert reborn.delete([Label("any", "name", "allow-web")]) == (2, 1)


def test_rules_stored_by_older_agents_load() -> None:
    store = MemoryStore()
    store.put("policy", {"version": 1, "kind": "policy", "revision": 7, "next_id": 4,
                         "rules": [{"id": 3, "raw": json.dumps(A)}]})
    repo = Repository(store)
    assert (repo.revision, [(r.id, r.name) for r in repo.rules]) == (7, [(3, "name=a")])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "enableDefaultDeny must be an object"),
        ({"ingres": False}, "unknown field 'ingres'"),
        ({"ingress": "no"}, "enableDefaultDeny.ingress must be true or false"),
    ],
)
def test_enable_default_deny_is_validated(value: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_rules([{"endpointSelector": {}, "egress": [{}], "enableDefaultDeny": value}])
