"""CIDR policy, the pure part: parsing of fromCIDR/toCIDR/fromCIDRSet/toCIDRSet (as Cilium's sanitize),
CIDR selectors with except, the labels of CIDR identities, their allocation, persistence and release,
and the longest-prefix resolution the datapath does."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datapath import cidr
from datapath import identity as ids
from datapath.cidr import CidrIdentities, CidrSelector, labels_of, prefix_of, resolve
from datapath.errors import InvalidRequest
from datapath.labels import Label
from datapath.policy import parse_rules
from datapath.policy.rules import named_prefixes
from datapath.store import MemoryStore

N = ipaddress.ip_network
SEL = {"matchLabels": {"app": "web"}}


def peer(section: str, entry: dict[str, Any]) -> Any:
    (rule,) = parse_rules([{"endpointSelector": SEL, section: [entry]}])
    return getattr(rule, {"ingress": "ingress", "egress": "egress", "ingressDeny": "ingress_deny",
                          "egressDeny": "egress_deny"}[section])[0]


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits masked off, as Cilium (netip.ParsePrefix + Masked)
    ("198.51.100.7", "198.51.100.7/32"),  # an address is its /32 ...
    ("2001:db8::1", "2001:db8::1/128"),  # ... or /128
    ("2001:db8:cg::/64".replace("cg", "c9"), "2001:db8:c9::/64"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    (" 10.0.0.0/8 ", "10.0.0.0/8"),
])
def test_to_cidr_takes_prefixes_and_addresses(text: str, want: str) -> None:
    pr = peer("egress", {"toCIDR": [text]})
    assert pr.cidrs == (CidrSelector(N(want)),)
    assert pr.has_l3 and not pr.nobody


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"toCIDR": ["10.0.0.300/8"]}, "egress[0].toCIDR[0]: '10.0.0.300/8' is not a CIDR"),
    ({"toCIDR": ["10.0.0.0/33"]}, "is not a CIDR"),
    ({"toCIDR": ["10.0.0.0/-1"]}, "bad prefix length"),
    ({"toCIDR": ["example.com"]}, "is not an IP address or CIDR"),
    ({"toCIDR": [""]}, "must be a CIDR string"),
    ({"toCIDR": [10]}, "must be a CIDR string"),
    ({"toCIDR": "10.0.0.0/8"}, "toCIDR: must be a list of CIDRs"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "192.168.0.0/16"]}]},
     "toCIDRSet[0].except[1]: 192.168.0.0/16 is not inside the cidr 10.0.0.0/8"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}]}, "is not inside the cidr"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["2001:db8::/64"]}]}, "is not inside the cidr"),
    ({"toCIDRSet": [{"cidr": "10.0.0.1"}]}, "must be a prefix with a length"),  # as Cilium: only a/n here
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.0.0.1"]}]}, "must be a prefix with a length"),
    ({"toCIDRSet": [{"except": ["10.0.0.0/9"]}]}, "toCIDRSet[0].cidr: required"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "expect": []}]}, "toCIDRSet[0]: unknown field 'expect'"),
    ({"toCIDRSet": [{"cidrGroupRef": "office"}]}, "toCIDRSet[0].cidrGroupRef: CIDR groups"),
    ({"toCIDRSet": [{"cidrGroupSelector": {}}]}, "cidrGroupSelector: CIDR groups"),
    ({"toCIDRSet": ["10.0.0.0/8"]}, "toCIDRSet[0]: must be an object"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}]}, "except: must be a list"),
    ({"toCIDR": ["10.0.0.0/8"], "toCIDRSet": [{"cidr": "11.0.0.0/8"}]}, "combining toCIDR and toCIDRSet"),
    ({"toCIDR": ["10.0.0.0/8"], "toEndpoints": [SEL]}, "combining toEndpoints and toCIDR"),
    ({"toCIDR": ["10.0.0.0/8"], "toEntities": ["world"]}, "combining toEntities and toCIDR"),
    ({"toCIDRs": ["10.0.0.0/8"]}, "unknown field 'toCIDRs' (did you mean 'toCIDR'?)"),
])
def test_bad_cidr_rules_are_refused_and_named(entry: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules([{"endpointSelector": SEL, "egress": [entry]}])
    assert fragment in str(err.value)
    assert "rule 0: egress[0]" in str(err.value)


def test_ingress_and_deny_sections_take_cidrs_too() -> None:
    assert peer("ingress", {"fromCIDR": ["203.0.113.0/24"]}).cidrs == (CidrSelector(N("203.0.113.0/24")),)
    assert peer("ingressDeny", {"fromCIDRSet": [{"cidr": "203.0.113.0/24"}]}).cidrs == \
        (CidrSelector(N("203.0.113.0/24")),)
    deny = peer("egressDeny", {"toCIDRSet": [{"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}],
                               "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]})
    assert deny.cidrs == (CidrSelector(N("2001:db8::/32"), (N("2001:db8:1::/48"),)),)
    assert [str(p) for p in deny.ports] == ["443/TCP"]
    with pytest.raises(InvalidRequest, match="ingress\\[0\\]: unknown field 'toCIDR'"):
        parse_rules([{"endpointSelector": SEL, "ingress": [{"toCIDR": ["10.0.0.0/8"]}]}])


def test_an_empty_cidr_list_selects_nobody() -> None:
    assert peer("egress", {"toCIDR": []}).nobody
    assert peer("egress", {"toCIDRSet": []}).nobody


def test_the_prefixes_named_are_cidrs_and_excepts_of_every_section() -> None:
    rules = parse_rules([{"endpointSelector": SEL,
                          "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}],
                          "ingressDeny": [{"fromCIDR": ["198.51.100.1"]}]},
                         {"endpointSelector": SEL, "ingress": [{"fromEntities": ["world"]}]}])
    assert named_prefixes(rules) == {N("10.0.0.0/8"), N("10.1.0.0/16"), N("198.51.100.1/32")}


def test_a_stored_cidr_rule_reads_back_with_the_same_meaning() -> None:
    from datapath.policy import Repository

    store = MemoryStore()
    repo = Repository(store)
    repo.add(parse_rules([{"endpointSelector": SEL, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8",
                                                                                "except": ["10.9.0.0/16"]}]}]}]))
    again = Repository(store)
    assert again.rules[0].egress == repo.rules[0].egress


# -- selectors and labels -----------------------------------------------------------------------


def test_labels_name_the_prefix_every_enclosing_prefix_and_world() -> None:
    labels = labels_of(N("10.1.0.0/16"))
    assert Label("cidr", "10.1.0.0/16") in labels and Label("cidr", "10.0.0.0/8") in labels
    assert Label("cidr", "0.0.0.0/0") in labels and Label("reserved", "world") in labels
    assert Label("cidr", "10.1.0.0/17") not in labels
    assert len(labels) == 17 + 1
    assert len(labels_of(N("2001:db8::/64"))) == 65 + 1
    assert prefix_of(labels) == N("10.1.0.0/16")
    assert prefix_of(frozenset({Label("container", "app", "x")})) is None
    assert all(Label.parse(str(lb)) == lb for lb in labels_of(N("2001:db8::1/128")))  # text form reads back


@pytest.mark.parametrize(("prefix", "selected"), [
    ("10.0.0.0/8", True),
    ("10.2.0.0/16", True),
    ("10.2.3.4/32", True),
    ("10.1.0.0/16", False),  # the except itself
    ("10.1.7.0/24", False),  # inside the except
    ("10.0.0.0/7", False),  # larger than the cidr
    ("11.0.0.0/8", False),
    ("0.0.0.0/0", False),
    ("::/0", False),
])
def test_a_selector_matches_prefixes_inside_its_cidr_and_outside_its_excepts(prefix: str, selected: bool) -> None:
    sel = CidrSelector(N("10.0.0.0/8"), (N("10.1.0.0/16"),))
    assert sel.matches_prefix(N(prefix)) is selected
    assert sel.matches(labels_of(N(prefix))) is selected  # the label form agrees
    if N(prefix).prefixlen >= 8:  # an address inside the prefix is selected as the prefix is
        assert sel.contains(N(prefix).network_address) is selected


def test_a_selector_matches_no_endpoint_or_reserved_identity() -> None:
    sel = CidrSelector(N("0.0.0.0/0"))
    for labels in ids.RESERVED_LABELS.values():
        assert not sel.matches(labels)
    assert not sel.matches(frozenset({Label("container", "app", "web")}))


# -- identities ---------------------------------------------------------------------------------


def test_identities_are_local_scope_persisted_and_released() -> None:
    store = MemoryStore()
    reg = CidrIdentities(store)
    assert reg.acquire([N("10.0.0.0/8"), N("2001:db8::/32"), N("10.0.0.0/8")]) == [N("10.0.0.0/8"), N("2001:db8::/32")]
    first = reg.number_of(N("10.0.0.0/8"))
    second = reg.number_of(N("2001:db8::/32"))
    assert first == (1 << 24) + 1 and second == (1 << 24) + 2
    assert cidr.is_cidr_identity(first) and not cidr.is_cidr_identity(ids.WORLD)
    assert not cidr.is_cidr_identity(ids.PENDING_FIRST) and not cidr.is_cidr_identity(65535)
    assert reg.acquire([N("10.0.0.0/8")]) == []  # already held: the same number
    assert reg.labels_of(second) == labels_of(N("2001:db8::/32"))
    # a restart reads the same numbers back
    again = CidrIdentities(store)
    assert again.prefixes() == {N("10.0.0.0/8"): first, N("2001:db8::/32"): second}
    assert again.all()[first] == labels_of(N("10.0.0.0/8"))
    # release forgets (in the store too); numbers are not reused at once
    assert again.release([N("10.0.0.0/8"), N("11.0.0.0/8")]) == [first]
    assert CidrIdentities(store).prefixes() == {N("2001:db8::/32"): second}
    assert again.acquire([N("12.0.0.0/8")]) and again.number_of(N("12.0.0.0/8")) == second + 1


def test_unreadable_or_out_of_scope_documents_are_skipped() -> None:
    store = MemoryStore()
    store.put("a", {"prefix": "10.0.0.0/8", "id": 300})  # not a CIDR-scope number
    store.put("b", {"prefix": "nonsense", "id": (1 << 24) + 5})
    store.put("c", {"id": (1 << 24) + 6})
    store.put("d", {"prefix": "10.0.0.0/8", "id": (1 << 24) + 7})
    store.put("e", {"prefix": "11.0.0.0/8", "id": (1 << 24) + 7})  # number in use
    assert CidrIdentities(store).prefixes() == {N("10.0.0.0/8"): (1 << 24) + 7}


def test_a_failed_write_allocates_nothing() -> None:
    store = MemoryStore()
    reg = CidrIdentities(store)
    reg.acquire([N("10.0.0.0/8")])

    class Failing(MemoryStore):
        def put(self, key: str, doc: dict[str, Any]) -> None:
            if "12.0.0.0" in str(doc.get("prefix")):
                raise OSError("disk full")
            super().put(key, doc)

    failing = Failing()
    reg = CidrIdentities(failing)
    with pytest.raises(OSError):
        reg.acquire([N("11.0.0.0/8"), N("12.0.0.0/8")])
    assert reg.prefixes() == {} and failing.docs == {}


def test_resolve_is_the_longest_prefix_else_world() -> None:
    table = {N("10.0.0.0/8"): 100, N("10.1.0.0/16"): 101, N("10.1.2.3/32"): ids.HOST, N("::/0"): 102}
    a = ipaddress.ip_address
    assert resolve(a("10.1.2.3"), table) == (N("10.1.2.3/32"), ids.HOST)
    assert resolve(a("10.1.9.9"), table) == (N("10.1.0.0/16"), 101)
    assert resolve(a("10.200.0.1"), table) == (N("10.0.0.0/8"), 100)
    assert resolve(a("192.0.2.1"), table) == (None, ids.WORLD)
    assert resolve(a("2001:db8::1"), table) == (N("::/0"), 102)
