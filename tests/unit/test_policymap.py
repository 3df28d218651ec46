"""datapath.policy.compile: port prefixes, compiling rules into LPM policy-map entries, and decide()."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datapath import identity as ids
from datapath.labels import Label, LabelSet
from datapath.policy import parse_rules
from datapath.policy.compile import (
    Entries,
    PolicyKey,
    PolicyValue,
    compile_all,
    compile_subject,
    decide,
    enforcement,
    port_prefixes,
)

TCP, UDP = 6, 17


def L(*texts: str) -> LabelSet:
    return frozenset(Label.parse(t, "container") for t in texts)


WEB, DB, DEV, CACHE = 256, 257, 258, 259
IDENTITIES: dict[int, LabelSet] = {
    **ids.RESERVED_LABELS,
    WEB: L("app=web", "env=prod"),
    DB: L("app=db", "env=prod"),
    DEV: L("app=db", "env=dev"),
    CACHE: L("app=cache"),
}
WEB_SEL = {"matchLabels": {"app": "web"}}
DB_SEL = {"matchLabels": {"app": "db"}}


def ports(*specs: str) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        port, _, proto = spec.partition("/")
        first, _, last = port.partition("-")
        entry: dict[str, Any] = {"port": first, "protocol": proto or "TCP"}
        if last:
            entry["endPort"] = int(last)
        out.append(entry)
    return [{"ports": out}]


def comp(rules: list[dict[str, Any]], subject: int = WEB, mode: str = "default",
         identities: dict[int, LabelSet] | None = None) -> Entries:
    idents = IDENTITIES if identities is None else identities
    return compile_subject(subject, idents[subject], parse_numbered(rules), idents, mode)


def parse_numbered(rules: list[dict[str, Any]]) -> list[Any]:
    """Rules with ids 1, 2, ... as the repository would give them."""
    from dataclasses import replace

    return [replace(r, id=i) for i, r in enumerate(parse_rules(rules) if rules else [], start=1)]


def key(peer: int, proto: int = 0, port: int = 0, bits: int = 0, egress: bool = False, subject: int = WEB,
        any_proto: bool = False) -> PolicyKey:
    return PolicyKey(subject, egress, peer, proto, port, bits, any_proto)


def anykey(peer: int, egress: bool = False, subject: int = WEB) -> PolicyKey:
    return PolicyKey(subject, egress, peer, 0, 0, 0, True)


ALLOW1, ALLOW2, DENY1, DENY2 = PolicyValue(False, 1), PolicyValue(False, 2), PolicyValue(True, 1), PolicyValue(True, 2)
DEFAULT = PolicyValue(False, 0)
OPEN_EGRESS = {anykey(ids.ANY, egress=True): DEFAULT}
OPEN_INGRESS = {anykey(ids.ANY): DEFAULT}


# -- port prefixes ----------------------------------------------------------------------------


def minimal_cover(first: int, last: int, start: int = 0, bits: int = 0) -> set[tuple[int, int]]:
    """The canonical (fewest-blocks) prefix cover, by walking the 16-bit trie."""
    end = start + (1 << (16 - bits)) - 1
    if end < first or start > last:
        return set()
    if first <= start and end <= last:
        return {(start, bits)}
    half = 1 << (15 - bits)
    return minimal_cover(first, last, start, bits + 1) | minimal_cover(first, last, start + half, bits + 1)


@given(st.integers(1, 65535), st.integers(0, 65535))
def test_port_prefixes_cover_a_range_exactly_with_the_fewest_blocks(first: int, span: int) -> None:
    last = min(65535, first + span)
    blocks = port_prefixes(first, last)
    covered: list[int] = []
    for port, bits in blocks:
        assert 1 <= bits <= 16
        size = 1 << (16 - bits)
        assert port % size == 0, "a block must be aligned to its size"
        covered.extend(range(port, port + size))
    assert covered == list(range(first, last + 1))  # in order, no gaps, no overlaps, nothing outside
    assert set(blocks) == minimal_cover(first, last)


@pytest.mark.parametrize(
    ("first", "last", "blocks"),
    [
        (80, 80, [(80, 16)]),
        (0, 0, [(0, 0)]),  # every port
        (8000, 8080, [(8000, 10), (8064, 12), (8080, 16)]),
        (1024, 2047, [(1024, 6)]),
        (32768, 65535, [(32768, 1)]),
        (1, 65535, [(1 << i, 16 - i) for i in range(16)]),
    ],
)
def test_port_prefixes_examples(first: int, last: int, blocks: list[tuple[int, int]]) -> None:
    assert port_prefixes(first, last) == blocks


# -- keys -------------------------------------------------------------------------------------


def test_key_prefix_lengths_and_text() -> None:
    assert key(DB, TCP, 80, 16).prefixlen == 96
    assert key(DB, TCP, 0, 0).prefixlen == 80
    assert key(DB, TCP, 8000, 10).prefixlen == 90
    assert anykey(DB).prefixlen == 72
    assert key(0, TCP, 80, 16).describe() == "ingress any 80/tcp"
    assert key(DB, TCP, 8000, 10, egress=True).describe() == "egress 257 8000-8063/tcp"
    assert key(DB, UDP).describe() == "ingress 257 udp"
    assert anykey(ids.HOST, egress=True).describe() == "egress 1 any"


@pytest.mark.parametrize(
    ("broad", "narrow", "covers"),
    [
        (anykey(DB), key(DB, TCP, 80, 16), True),
        (anykey(DB), anykey(DB), True),
        (key(DB, TCP), key(DB, TCP, 80, 16), True),
        (key(DB, TCP, 8000, 10), key(DB, TCP, 8064, 12), False),  # 8000-8063 vs 8064-8079
        (key(DB, TCP, 8000, 10), key(DB, TCP, 8032, 11), True),
        (key(DB, TCP, 80, 16), key(DB, TCP), False),
        (key(DB, TCP), key(DB, UDP, 80, 16), False),
        (key(DB, TCP), anykey(DB), False),
        (anykey(DB), anykey(CACHE), False),  # another peer
        (anykey(DB), anykey(DB, egress=True), False),
        (anykey(DB), anykey(DB, subject=CACHE), False),
    ],
)
def test_key_covers(broad: PolicyKey, narrow: PolicyKey, covers: bool) -> None:
    assert broad.covers(narrow) is covers


# -- compile ----------------------------------------------------------------------------------


def test_no_rules_default_mode_allows_everything_by_default() -> None:
    assert comp([]) == {**OPEN_INGRESS, **OPEN_EGRESS}


def test_l3_only_allows_every_port_from_the_selected_identities() -> None:
    entries = comp([{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]}])
    assert entries == {anykey(DB): ALLOW1, anykey(DEV): ALLOW1, **OPEN_EGRESS}


def test_l4_only_is_one_wildcard_entry_however_many_identities_exist() -> None:
    many = dict(IDENTITIES)
    many.update({n: L(f"n={n}") for n in range(1000, 6000)})
    rule = [{"endpointSelector": WEB_SEL, "ingress": [{"toPorts": ports("80/TCP")}]}]
    small, large = comp(rule), comp(rule, identities=many)
    assert small == large == {key(ids.ANY, TCP, 80, 16): ALLOW1, **OPEN_EGRESS}


def test_l3_and_l4() -> None:
    entries = comp([{"endpointSelector": WEB_SEL,
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"env": "dev"}}], "toPorts": ports("5432/TCP")}]}])
    assert entries == {key(DEV, TCP, 5432, 16): ALLOW1, **OPEN_EGRESS}


def test_port_ranges_and_any_protocol() -> None:
    entries = comp([{"endpointSelector": WEB_SEL, "egress": [
        {"toPorts": ports("8000-8080/TCP")},
        {"toPorts": [{"ports": [{"port": "53"}]}]},  # ANY with a port: every ported protocol
        {"toPorts": [{"ports": [{"protocol": "ICMP", "port": "8"}]}]},
    ]}])
    assert entries == {
        **OPEN_INGRESS,
        key(0, TCP, 8000, 10, egress=True): ALLOW1,
        key(0, TCP, 8064, 12, egress=True): ALLOW1,
        key(0, TCP, 8080, 16, egress=True): ALLOW1,
        key(0, TCP, 53, 16, egress=True): ALLOW1,
        key(0, UDP, 53, 16, egress=True): ALLOW1,
        key(0, 132, 53, 16, egress=True): ALLOW1,
        key(0, 1, 8, 16, egress=True): ALLOW1,
    }


def test_a_wildcard_selector_is_one_entry_per_endpoint_never_any_peer() -> None:
    """`{}` selects every endpoint, not the host or world: peer 0 would admit those too."""
    entries = comp([{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{}]}]}])
    assert entries == {**{anykey(n): ALLOW1 for n in (WEB, DB, DEV, CACHE)}, **OPEN_EGRESS}
    assert not decide(entries, WEB, False, ids.HOST, TCP, 80).allowed
    assert not decide(entries, WEB, False, ids.WORLD, TCP, 80).allowed


@pytest.mark.parametrize(
    ("entity", "peers"),
    [
        ("host", {ids.HOST}),
        ("world", {ids.WORLD}),
        ("init", {ids.INIT}),
        ("unmanaged", {ids.UNMANAGED}),
        ("remote-node", {ids.REMOTE_NODE}),
        ("all", {ids.ANY}),
        ("cluster", set(IDENTITIES) - {ids.WORLD}),
    ],
)
def test_entities(entity: str, peers: set[int]) -> None:
    entries = comp([{"endpointSelector": WEB_SEL, "ingress": [{"fromEntities": [entity]}]}])
    assert entries == {**{anykey(p): ALLOW1 for p in peers}, **OPEN_EGRESS}


def test_an_empty_section_only_turns_enforcement_on() -> None:
    assert comp([{"endpointSelector": WEB_SEL, "egress": [{}]}]) == OPEN_INGRESS
    assert comp([{"endpointSelector": WEB_SEL, "ingress": [{}]}]) == OPEN_EGRESS


def test_a_rule_that_does_not_select_the_subject_has_no_effect() -> None:
    assert comp([{"endpointSelector": DB_SEL, "ingress": [{"fromEntities": ["all"]}]}]) == {
        **OPEN_INGRESS, **OPEN_EGRESS}


def test_first_rule_wins_the_value_of_a_shared_allow() -> None:
    entries = comp([{"endpointSelector": WEB_SEL, "ingress": [{"toPorts": ports("80/TCP")}]},
                    {"endpointSelector": {}, "ingress": [{"toPorts": ports("80/TCP")}]}])
    assert entries[key(0, TCP, 80, 16)] == ALLOW1


def test_requires_deny_every_identity_that_does_not_match_reserved_ones_included() -> None:
    rules = [
        {"endpointSelector": {"matchLabels": {"env": "prod"}},
         "ingress": [{"fromRequires": [{"matchLabels": {"env": "prod"}}]}]},
        {"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [{"matchLabels": {"env": "dev"}}]},
                                                  {"fromEntities": ["host"]}]},
    ]
    entries = comp(rules)
    not_prod = {n for n, labels in IDENTITIES.items() if Label("container", "env", "prod") not in labels}
    assert ids.HOST in not_prod and ids.WORLD in not_prod and ids.INIT in not_prod and DEV in not_prod
    assert {k.peer for k, v in entries.items() if v.deny} == not_prod
    assert all(v == DENY1 for k, v in entries.items() if k.peer in not_prod and not k.egress)
    assert entries[anykey(DEV)] == DENY1  # the allow from env=dev is overridden
    assert entries[anykey(ids.HOST)] == DENY1
    assert not decide(entries, WEB, False, DEV, TCP, 80).allowed
    assert not decide(entries, WEB, False, ids.HOST, TCP, 80).allowed
    assert not decide(entries, WEB, False, DB, TCP, 80).allowed  # requires never allow by themselves
    assert decide(entries, WEB, True, DEV, TCP, 80).allowed  # egress is not touched


def test_requires_with_an_allow_from_a_matching_peer() -> None:
    rules = [{"endpointSelector": WEB_SEL, "ingress": [
        {"fromRequires": [{"matchLabels": {"env": "prod"}}]},
        {"fromEndpoints": [{"matchLabels": {"app": "db"}}]},
    ]}]
    entries = comp(rules)
    assert decide(entries, WEB, False, DB, TCP, 80).allowed  # db + prod
    assert not decide(entries, WEB, False, DEV, TCP, 80).allowed  # db but dev


def test_deny_beats_allow_at_the_same_key() -> None:
    entries = comp([{"endpointSelector": WEB_SEL,
                     "ingress": [{"fromEndpoints": [DB_SEL], "toPorts": ports("80/TCP")}],
                     "ingressDeny": [{"fromEndpoints": [DB_SEL], "toPorts": ports("80/TCP")}]}])
    assert entries == {key(DB, TCP, 80, 16): DENY1, key(DEV, TCP, 80, 16): DENY1, **OPEN_EGRESS}


def test_an_allow_inside_a_broader_deny_of_the_same_peer_is_dropped() -> None:
    """In an LPM lookup the longer allow would shadow the deny: it must not be in the map."""
    entries = comp([
        {"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL], "toPorts": ports("80/TCP", "443/TCP")}]},
        {"endpointSelector": WEB_SEL, "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"env": "dev"}}]}]},
        {"endpointSelector": WEB_SEL, "ingressDeny": [{"fromEndpoints": [DB_SEL], "toPorts": ports("0-0/TCP")}]},
    ])
    assert entries == {anykey(DEV): DENY2, key(DB, TCP): PolicyValue(True, 3), key(DEV, TCP): PolicyValue(True, 3),
                       **OPEN_EGRESS}
    for port in (80, 443):
        assert not decide(entries, WEB, False, DB, TCP, port).allowed


def test_a_narrower_deny_keeps_the_broader_allow() -> None:
    entries = comp([{"endpointSelector": WEB_SEL,
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"env": "dev"}}]}],
                     "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"env": "dev"}}],
                                      "toPorts": ports("22/TCP")}]}])
    assert entries == {anykey(DEV): ALLOW1, key(DEV, TCP, 22, 16): DENY1, **OPEN_EGRESS}
    assert not decide(entries, WEB, False, DEV, TCP, 22).allowed
    assert decide(entries, WEB, False, DEV, TCP, 23).allowed
    assert decide(entries, WEB, False, DEV, UDP, 22).allowed


def test_a_wildcard_deny_beats_a_specific_allow() -> None:
    entries = comp([{"endpointSelector": WEB_SEL,
                     "ingress": [{"fromEndpoints": [DB_SEL]}],
                     "ingressDeny": [{"toPorts": ports("22/TCP")}]}])
    assert entries[key(0, TCP, 22, 16)] == DENY1 and entries[anykey(DB)] == ALLOW1
    assert not decide(entries, WEB, False, DB, TCP, 22).allowed
    assert decide(entries, WEB, False, DB, TCP, 80).allowed


@pytest.mark.parametrize("section", ["ingressDeny", "egressDeny"])
def test_a_deny_only_rule_turns_default_deny_on_as_in_cilium(section: str) -> None:
    """Cilium: a rule with only deny entries in a direction still puts it into default deny."""
    entries = comp([{"endpointSelector": WEB_SEL, section: [{"fromEntities" if section == "ingressDeny"
                                                             else "toEntities": ["world"]}]}])
    egress = section == "egressDeny"
    open_other = OPEN_EGRESS if not egress else OPEN_INGRESS
    assert entries == {anykey(ids.WORLD, egress=egress): DENY1, **open_other}
    assert not decide(entries, WEB, egress, ids.WORLD, TCP, 80).allowed
    assert not decide(entries, WEB, egress, DB, TCP, 80).allowed  # default deny now
    assert decide(entries, WEB, not egress, ids.WORLD, TCP, 80).allowed


@pytest.mark.parametrize("section", ["ingressDeny", "egressDeny"])
def test_enable_default_deny_false_keeps_a_deny_only_rule_open(section: str) -> None:
    egress = section == "egressDeny"
    direction = "egress" if egress else "ingress"
    entries = comp([{"endpointSelector": WEB_SEL, "enableDefaultDeny": {direction: False},
                     section: [{"fromEntities" if not egress else "toEntities": ["world"]}]}])
    assert entries == {anykey(ids.WORLD, egress=egress): DENY1, **OPEN_INGRESS, **OPEN_EGRESS}
    assert not decide(entries, WEB, egress, ids.WORLD, TCP, 80).allowed
    assert decide(entries, WEB, egress, DB, TCP, 80).allowed


# -- enforcement modes and init ---------------------------------------------------------------

RULES = [{"endpointSelector": WEB_SEL, "ingress": [{"fromEndpoints": [DB_SEL]}]}]


@pytest.mark.parametrize(
    ("mode", "rules", "subject", "ingress", "egress"),
    [
        ("default", [], WEB, False, False),
        ("default", RULES, WEB, True, False),
        ("default", RULES, DB, False, False),  # not selected
        ("default", [{"endpointSelector": WEB_SEL, "egress": [{}]}], WEB, False, True),
        ("default", [{"endpointSelector": WEB_SEL, "ingressDeny": [{}], "egressDeny": [{}]}], WEB, True, True),
        ("default", [{"endpointSelector": WEB_SEL, "ingressDeny": [{}], "egressDeny": [{}],
                      "enableDefaultDeny": {"ingress": False, "egress": False}}], WEB, False, False),
        ("default", [{"endpointSelector": WEB_SEL, "ingress": [{}], "enableDefaultDeny": {"ingress": False}}],
         WEB, False, False),
        ("always", [], WEB, True, True),
        ("always", [], ids.INIT, True, True),
        ("never", RULES, WEB, False, False),
        ("never", RULES, ids.INIT, False, False),
        ("default", RULES, ids.INIT, True, True),  # labels unknown and rules exist: closed
        ("default", [], ids.INIT, False, False),  # an empty repository: open
    ],
)
def test_enforcement(mode: str, rules: list[Any], subject: int, ingress: bool, egress: bool) -> None:
    enf = enforcement(subject, IDENTITIES[subject], parse_numbered(rules), mode)
    assert (enf.ingress, enf.egress) == (ingress, egress)


def test_mode_always_without_rules_has_no_entries() -> None:
    entries = comp([], mode="always")
    assert entries == {}
    assert decide(entries, WEB, False, DB, TCP, 80).key is None


def test_mode_never_allows_everything_whatever_the_rules() -> None:
    rules = [*RULES, {"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["all"]}]}]
    assert comp(rules, mode="never") == {**OPEN_INGRESS, **OPEN_EGRESS}


def test_init_is_closed_when_rules_exist_unless_one_selects_it() -> None:
    assert comp(RULES, subject=ids.INIT) == {}
    assert comp([*RULES, {"endpointSelector": {}, "egress": [{"toEntities": ["host"]}]}], subject=ids.INIT) == {}
    init = {"matchLabels": {"reserved:init": ""}}  # `{}` selects endpoints; init must be named
    entries = comp([*RULES, {"endpointSelector": init, "egress": [{"toEntities": ["host"]}]}], subject=ids.INIT)
    assert entries == {anykey(ids.HOST, egress=True, subject=ids.INIT): PolicyValue(False, 2)}
    assert comp([], subject=ids.INIT) == {anykey(0, subject=ids.INIT): DEFAULT,
                                          anykey(0, egress=True, subject=ids.INIT): DEFAULT}


def test_compile_all_is_the_union_of_its_subjects() -> None:
    rules = parse_numbered(RULES)
    subjects = {WEB: IDENTITIES[WEB], DB: IDENTITIES[DB], ids.INIT: IDENTITIES[ids.INIT]}
    every = compile_all(subjects, rules, IDENTITIES)
    union: Entries = {}
    for n, labels in subjects.items():
        union.update(compile_subject(n, labels, rules, IDENTITIES))
    assert every == union and {k.subject for k in every} == {WEB, DB}  # init: closed, so no entries


# -- decide -----------------------------------------------------------------------------------

TABLE: Entries = {
    key(DB, TCP, 80, 16): ALLOW1,  # db may use 80/tcp
    key(0, TCP, 443, 16): ALLOW2,  # anyone may use 443/tcp
    key(0, TCP, 8000, 10): ALLOW1,  # anyone 8000-8063/tcp ...
    key(0, TCP, 8022, 16): DENY1,  # ... except 8022
    anykey(CACHE): ALLOW2,  # cache may do anything ...
    key(CACHE, UDP): DENY2,  # ... except UDP
    key(DEV, TCP, 443, 16): DENY1,  # dev may not use 443 even though anyone may
    key(DEV, UDP, 53, 16): ALLOW1,
    key(0, UDP, 53, 16): DENY2,  # nobody may use 53/udp, dev included: wildcard deny wins
    anykey(ids.HOST, egress=True): ALLOW1,
}


@pytest.mark.parametrize(
    ("egress", "peer", "proto", "port", "allowed", "decided_by"),
    [
        (False, DB, TCP, 80, True, key(DB, TCP, 80, 16)),
        (False, DB, TCP, 81, False, None),
        (False, DB, UDP, 80, False, None),
        (False, DB, TCP, 443, True, key(0, TCP, 443, 16)),
        (False, ids.WORLD, TCP, 443, True, key(0, TCP, 443, 16)),
        (False, ids.ANY, TCP, 443, True, key(0, TCP, 443, 16)),
        (False, ids.ANY, TCP, 80, False, None),  # peer 0 only sees wildcard entries
        (False, DB, TCP, 8000, True, key(0, TCP, 8000, 10)),
        (False, DB, TCP, 8063, True, key(0, TCP, 8000, 10)),
        (False, DB, TCP, 8064, False, None),
        (False, DB, TCP, 8022, False, key(0, TCP, 8022, 16)),  # longest prefix wins inside one peer
        (False, CACHE, TCP, 1234, True, anykey(CACHE)),
        (False, CACHE, UDP, 1234, False, key(CACHE, UDP)),
        (False, CACHE, TCP, 8022, False, key(0, TCP, 8022, 16)),  # a wildcard deny beats a specific allow
        (False, DEV, TCP, 443, False, key(DEV, TCP, 443, 16)),  # a specific deny beats a wildcard allow
        (False, DEV, UDP, 53, False, key(0, UDP, 53, 16)),
        (False, DEV, TCP, 8001, True, key(0, TCP, 8000, 10)),
        (True, DB, TCP, 80, False, None),  # the direction is part of the key
        (True, ids.HOST, UDP, 9, True, anykey(ids.HOST, egress=True)),
        (False, ids.HOST, UDP, 9, False, None),
    ],
)
def test_decide(egress: bool, peer: int, proto: int, port: int, allowed: bool, decided_by: PolicyKey | None) -> None:
    d = decide(TABLE, WEB, egress, peer, proto, port)
    assert (d.allowed, d.key) == (allowed, decided_by)
    assert d.value == (TABLE[decided_by] if decided_by else None)
    assert d.rule == (TABLE[decided_by].rule if decided_by else 0)


def test_decide_only_reads_the_subject_s_entries() -> None:
    assert decide(TABLE, DB, False, DB, TCP, 80).key is None
