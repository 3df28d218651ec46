"""L7 rules from compile to kernel: the merged filter of each policy entry (compile), the kind
check of imports, the numbered filter table the proxy reads, PolicyState on the fake kernel,
`policy trace` with a request, and the trace request parsed at the REST door."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from datapath import identity as ids
from datapath.errors import CellgateError, InvalidRequest
from datapath.fake import FakeKernel
from datapath.identity import Identities
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint
from datapath.policy import Repository, Rule, parse_rules
from datapath.policy.compile import (
    Entries,
    PolicyKey,
    PolicyValue,
    compile_all,
    compile_subject,
    decide,
    l7_kind_conflicts,
    port_prefixes,
)
from datapath.policy.l7 import (
    Grant,
    HttpRequest,
    HttpRule,
    KafkaRequest,
    L7Filter,
    normalize_path,
)
from datapath.policy.trace import Party, trace
from datapath.store import MemoryStore
from plugin.api.messages import TraceRequest
from plugin.service import l7filters
from plugin.service.l7filters import FilterTable
from plugin.service.policy import PolicyState

TCP = 6


def L(*texts: str) -> LabelSet:
    return frozenset(Label.parse(t, "container") for t in texts)


WEB, DB, CACHE = 256, 257, 259
IDENTITIES: dict[int, LabelSet] = {**ids.RESERVED_LABELS, WEB: L("app=web"), DB: L("app=db"), CACHE: L("app=cache")}
SEL = {"web": {"matchLabels": {"app": "web"}}, "db": {"matchLabels": {"app": "db"}}}
PORT80 = [{"port": "80", "protocol": "TCP"}]


def section(egress: bool, peer: str | None, ports: list[dict[str, Any]] | None, rules: Any = None) -> dict[str, Any]:
    """One ingress/egress entry: from/to `peer` (None: any peer), on `ports` (None: every port)."""
    out: dict[str, Any] = {}
    if peer is not None:
        out["toEndpoints" if egress else "fromEndpoints"] = [SEL[peer]]
    if ports is not None:
        out["toPorts"] = [{"ports": ports, **({"rules": rules} if rules is not None else {})}]
    return out


def rule(name: str, *, peer: str | None = "db", ports: list[dict[str, Any]] | None = PORT80, rules: Any = None,
         egress: bool = False, deny: bool = False) -> dict[str, Any]:
    """A rule for app=web (the subject) named `name=...`."""
    key = ("egress" if egress else "ingress") + ("Deny" if deny else "")
    return {"labels": [f"name={name}"], "endpointSelector": SEL["web"], key: [section(egress, peer, ports, rules)]}


def http(*paths: str) -> dict[str, Any]:
    return {"http": [{"method": "GET", "path": p} for p in paths]}


def numbered(*raw: dict[str, Any]) -> list[Rule]:
    """Rules with repository ids 1, 2, ... (parsed one by one: no import check between them)."""
    return [replace(r, id=i) for i, r in enumerate((parse_rules([x])[0] for x in raw), start=1)]


def compiled(*raw: dict[str, Any]) -> Entries:
    return compile_subject(WEB, IDENTITIES[WEB], numbered(*raw), IDENTITIES)


def key(peer: int, port: int = 80, egress: bool = False, bits: int = 16) -> PolicyKey:
    return PolicyKey(WEB, egress, peer, TCP, port, bits)


def filter_at(entries: Entries, peer: int, port: int = 80, egress: bool = False) -> L7Filter | None:
    """The filter of the entry the kernel takes for this packet (it must be allowed)."""
    d = decide(entries, WEB, egress, peer, TCP, port)
    assert d.allowed and d.value is not None, f"{peer}:{port} is not allowed at L4"
    return d.value.filter


def rules_of(f: L7Filter | None) -> list[int]:
    assert f is not None, "no L7 filter: every request would pass"
    return [g.rule for g in f.grants]


def get(path: str) -> HttpRequest:
    return HttpRequest("GET", path, "web")


# -- 1. compile: the filter of each entry -------------------------------------------------------------


def test_an_l7_rule_gives_its_entry_a_filter_that_holds_the_rule() -> None:
    entries = compiled(rule("a", rules=http("/a")))
    value = entries[key(DB)]
    assert value == PolicyValue(False, 1) and value.l7 == 0  # compile leaves numbering to the service
    assert value.filter == L7Filter("http", (Grant(1, "name=a", http=(HttpRule("GET", "/a"),)),))
    assert filter_at(entries, DB) is value.filter
    assert value.filter.http_verdict(get("/a")).allowed
    assert not value.filter.http_verdict(get("/b")).allowed


def test_two_l7_rules_for_one_peer_and_port_merge_and_either_allows() -> None:
    f = filter_at(compiled(rule("a", rules=http("/a")), rule("b", rules=http("/b"))), DB)
    assert rules_of(f) == [1, 2]
    assert f is not None
    assert (f.http_verdict(get("/a")).allowed, f.http_verdict(get("/a")).rule) == (True, 1)
    assert (f.http_verdict(get("/b")).allowed, f.http_verdict(get("/b")).rule) == (True, 2)
    assert not f.http_verdict(get("/c")).allowed


OPENERS = {  # allows that let every request of db on 80 through, whatever the L7 rules say
    "L4-only, same peer and port": rule("open", rules=None),
    "L4-only for any peer on the port": rule("open", peer=None),
    "L3-only for the peer": rule("open", ports=None),
    "every port of the peer (TCP, no port)": rule("open", ports=[{"port": "0", "protocol": "TCP"}]),
    "a wider range of the peer": rule("open", ports=[{"port": "64", "endPort": 127, "protocol": "TCP"}]),
    "entity all": {"labels": ["name=open"], "endpointSelector": SEL["web"], "ingress": [{"fromEntities": ["all"]}]},
}


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize("l7_first", [True, False], ids=["l7 first", "l4 first"])
def test_an_allow_without_l7_rules_that_covers_the_entry_leaves_it_without_filter(opener: dict[str, Any],
                                                                                  l7_first: bool) -> None:
    l7 = rule("a", rules=http("/a"))
    entries = compiled(*((l7, opener) if l7_first else (opener, l7)))
    assert filter_at(entries, DB) is None
    assert entries[key(DB)].filter is None
    assert not any(v.filter for k, v in entries.items() if k.peer == DB)


def test_an_l4_only_rule_on_another_port_leaves_the_filter() -> None:
    entries = compiled(rule("a", rules=http("/a")), rule("b", ports=[{"port": "81", "protocol": "TCP"}]),
                       rule("c", peer=None, ports=[{"port": "8080", "protocol": "TCP"}]))
    assert rules_of(filter_at(entries, DB)) == [1]
    assert filter_at(entries, DB, 81) is None


@pytest.mark.parametrize("egress", [False, True], ids=["ingress", "egress"])
def test_a_wildcard_peer_s_l7_rules_merge_into_the_specific_peer_s_entry(egress: bool) -> None:
    entries = compiled(rule("any", peer=None, rules=http("/any"), egress=egress),
                       rule("db", rules=http("/db"), egress=egress))
    assert rules_of(entries[key(ids.ANY, egress=egress)].filter) == [1]
    assert rules_of(entries[key(DB, egress=egress)].filter) == [1, 2]
    f = filter_at(entries, DB, egress=egress)
    assert f is not None and f.http_verdict(get("/any")).rule == 1 and f.http_verdict(get("/db")).rule == 2
    # a peer only the wildcard selects gets the wildcard's rules alone
    only = filter_at(entries, CACHE, egress=egress)
    assert rules_of(only) == [1]
    assert only is not None and only.http_verdict(get("/any")).allowed
    assert not only.http_verdict(get("/db")).allowed


@pytest.mark.parametrize("egress", [False, True], ids=["ingress", "egress"])
def test_egress_l7_rules_merge_and_open_alike(egress: bool) -> None:
    merged = compiled(rule("a", rules=http("/a"), egress=egress), rule("b", rules=http("/b"), egress=egress))
    assert rules_of(filter_at(merged, DB, egress=egress)) == [1, 2]
    opened = compiled(rule("a", rules=http("/a"), egress=egress), rule("b", peer=None, egress=egress))
    assert filter_at(opened, DB, egress=egress) is None
    assert filter_at(opened, CACHE, egress=egress) is None
    # the other direction has no L7 rules at all
    assert not any(v.filter for k, v in merged.items() if k.egress != egress)


@pytest.mark.parametrize("deny_peer", ["db", None], ids=["deny from db", "deny from anyone"])
def test_a_deny_on_the_port_still_denies_whatever_the_l7_rules(deny_peer: str | None) -> None:
    entries = compiled(rule("a", rules=http("/a")), rule("any", peer=None, rules=http("/any")),
                       rule("no", peer=deny_peer, deny=True))
    d = decide(entries, WEB, False, DB, TCP, 80)
    assert not d.allowed and d.rule == 3
    if deny_peer is None:
        assert not decide(entries, WEB, False, CACHE, TCP, 80).allowed
    # a deny on another port leaves the filter alone
    other = compiled(rule("a", rules=http("/a")), rule("no", ports=[{"port": "81", "protocol": "TCP"}], deny=True))
    assert rules_of(filter_at(other, DB)) == [1]


def test_a_port_range_with_l7_rules_gives_every_block_the_filter() -> None:
    entries = compiled(rule("a", ports=[{"port": "8000", "endPort": 8080, "protocol": "TCP"}], rules=http("/a")))
    blocks = port_prefixes(8000, 8080)
    assert len(blocks) > 1
    for port, bits in blocks:
        assert rules_of(entries[key(DB, port, bits=bits)].filter) == [1], (port, bits)
    for port in (8000, 8031, 8064, 8080):
        assert rules_of(filter_at(entries, DB, port)) == [1]
    assert not decide(entries, WEB, False, DB, TCP, 8081).allowed


def test_a_wildcard_port_inside_a_peer_s_l7_range_still_applies_to_that_peer() -> None:
    """The kernel takes the peer's own entry first: the wildcard's rules on 8040 must be in the
    entry it takes for the peer on 8040, not only in the wildcard entry it never reaches."""
    ranged = rule("range", ports=[{"port": "8000", "endPort": 8080, "protocol": "TCP"}], rules=http("/range"))
    l7 = compiled(ranged, rule("any", peer=None, ports=[{"port": "8040", "protocol": "TCP"}], rules=http("/any")))
    assert rules_of(filter_at(l7, DB, 8040)) == [1, 2]
    assert rules_of(filter_at(l7, DB, 8041)) == [1]
    assert rules_of(filter_at(l7, CACHE, 8040)) == [2]
    l4 = compiled(ranged, rule("any", peer=None, ports=[{"port": "8040", "protocol": "TCP"}]))
    assert filter_at(l4, DB, 8040) is None  # anyone may send anything to 8040
    assert rules_of(filter_at(l4, DB, 8041)) == [1]
    # a deny of the peer on that port is not shadowed by the added entry
    denied = compiled(ranged, rule("any", peer=None, ports=[{"port": "8040", "protocol": "TCP"}]),
                      rule("no", ports=[{"port": "8040", "protocol": "TCP"}], deny=True))
    assert not decide(denied, WEB, False, DB, TCP, 8040).allowed


def test_compile_all_gives_the_same_filters_as_compile_subject() -> None:
    rules = numbered(rule("any", peer=None, rules=http("/any")), rule("db", rules=http("/db")))
    alone = compile_subject(WEB, IDENTITIES[WEB], rules, IDENTITIES)
    every = compile_all({WEB: IDENTITIES[WEB], DB: IDENTITIES[DB]}, rules, IDENTITIES)
    assert {k: v.filter for k, v in alone.items()} == {k: v.filter for k, v in every.items() if k.subject == WEB}


KAFKA = {"kafka": [{"topic": "orders"}]}


@pytest.mark.parametrize("kafka_peer", ["db", None], ids=["same peer", "kafka for any peer"])
def test_http_and_kafka_on_one_entry_deny_every_request(kafka_peer: str | None) -> None:
    entries = compiled(rule("web", rules=http("/a")), rule("kafka", peer=kafka_peer, rules=KAFKA))
    f = filter_at(entries, DB)
    assert f == L7Filter("http", ())
    assert f is not None
    assert not f.http_verdict(get("/a")).allowed
    assert not f.kafka_verdict(KafkaRequest(0, 0, None, ("orders",))).allowed


# -- 1b. the kind check of imports --------------------------------------------------------------------


CONFLICTS = [
    ("same port", PORT80, PORT80),
    ("kafka port inside the http range", [{"port": "80", "endPort": 90, "protocol": "TCP"}],
     [{"port": "85", "protocol": "TCP"}]),
    ("overlapping ranges", [{"port": "80", "endPort": 90, "protocol": "TCP"}],
     [{"port": "90", "endPort": 100, "protocol": "TCP"}]),
]


@pytest.mark.parametrize(("http_ports", "kafka_ports"), [c[1:] for c in CONFLICTS], ids=[c[0] for c in CONFLICTS])
@pytest.mark.parametrize("egress", [False, True], ids=["ingress", "egress"])
def test_http_and_kafka_on_overlapping_ports_conflict(http_ports: list[dict[str, Any]],
                                                      kafka_ports: list[dict[str, Any]], egress: bool) -> None:
    rules = numbered(rule("web-http", ports=http_ports, rules=http("/a"), egress=egress),
                     rule("web-kafka", peer=None, ports=kafka_ports, rules=KAFKA, egress=egress))
    message = l7_kind_conflicts(rules)
    assert message is not None
    assert "name=web-http" in message and "name=web-kafka" in message
    assert ("egress" if egress else "ingress") in message


@pytest.mark.parametrize(("a", "b"), [
    (rule("h", rules=http("/a")), rule("k", rules=KAFKA, egress=True)),
    (rule("h", rules=http("/a"), egress=True), rule("k", rules=KAFKA)),
    (rule("h", rules=http("/a")), rule("k", ports=[{"port": "9092", "protocol": "TCP"}], rules=KAFKA)),
    (rule("h", ports=[{"port": "80", "endPort": 90, "protocol": "TCP"}], rules=http("/a")),
     rule("k", ports=[{"port": "91", "endPort": 99, "protocol": "TCP"}], rules=KAFKA)),
    (rule("h", rules=http("/a")), rule("h2", peer=None, rules=http("/b"))),
    (rule("h", rules=http("/a")), rule("l4", peer=None)),
], ids=["ingress http, egress kafka", "egress http, ingress kafka", "disjoint ports", "adjacent ranges",
        "http twice", "http and L4-only"])
def test_no_conflict_across_directions_or_disjoint_ports(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert l7_kind_conflicts(numbered(a, b)) is None


# -- 2. the filter table ------------------------------------------------------------------------------


def filt(path: str, rule_id: int = 1) -> L7Filter:
    return L7Filter("http", (Grant(rule_id, f"rule {rule_id}", http=(HttpRule("GET", path),)),))


def with_filters(*filters: L7Filter | None) -> Entries:
    return {key(DB, 80 + i): PolicyValue(False, 1, 0, f) for i, f in enumerate(filters)}


def numbers(table: FilterTable, *filters: L7Filter | None) -> list[int]:
    return [v.l7 for v in table.number(with_filters(*filters)).values()]


def on_file(path: Path) -> dict[int, L7Filter]:
    data = json.loads(path.read_text())
    return {int(n): L7Filter.from_json(raw) for n, raw in data["filters"].items()}


def test_numbering_is_stable_and_distinct(tmp_path: Path) -> None:
    table = FilterTable(tmp_path / "filters.json")
    a, b, a_again = numbers(table, filt("/a"), filt("/b"), filt("/a"))
    assert a and b and a != b and a_again == a
    assert numbers(table, filt("/b"), filt("/a")) == [b, a]
    assert numbers(table, None) == [0]  # an entry without filter names none
    numbered_entries = table.number(with_filters(filt("/a")))
    assert next(iter(numbered_entries.values())).filter == filt("/a")


def test_numbers_survive_a_new_table_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy" / "filters.json"
    first = FilterTable(path)
    a, b = numbers(first, filt("/a"), filt("/b"))
    first.publish()
    assert on_file(path) == {a: filt("/a"), b: filt("/b")}
    assert not list(path.parent.glob("*.tmp"))
    again = FilterTable(path)
    assert numbers(again, filt("/b"), filt("/a")) == [b, a]
    assert numbers(again, filt("/c"))[0] not in (0, a, b)


def test_retire_and_publish_drop_unused_filters(tmp_path: Path) -> None:
    path = tmp_path / "filters.json"
    table = FilterTable(path)
    a, b = numbers(table, filt("/a"), filt("/b"))
    table.publish()
    assert set(on_file(path)) == {a, b}
    assert table.retire({a}) is True
    table.publish()
    assert on_file(path) == {a: filt("/a")}
    assert table.retire({a}) is False
    c = numbers(table, filt("/b"))[0]
    assert c not in (0, a)  # a filter back after retirement is a new one


CORRUPT = {
    "not json": "{not json",
    "a list": "[]",
    "filters not an object": '{"filters": []}',
    "next null": '{"next": null, "filters": {}}',
    "next zero": '{"next": 0, "filters": {}}',
    "number not a number": '{"filters": {"x": {"kind": "http", "grants": []}}}',
    "number zero (no filter: open)": '{"filters": {"0": {"kind": "http", "grants": []}}}',
    "number too big": '{"filters": {"70000": {"kind": "http", "grants": []}}}',
    "bad filter after a good one": '{"filters": {"1": {"kind": "http", "grants": []}, "2": {"kind": "ftp"}}}',
}


@pytest.mark.parametrize("text", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_file_gives_an_empty_table_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         text: str) -> None:
    path = tmp_path / "filters.json"
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger=l7filters.__name__):
        table = FilterTable(path)
    assert table.by_id == {} and table.ids == {}
    assert any("cannot read the L7 filters" in r.getMessage() for r in caplog.records)
    assert numbers(table, filt("/a")) == [1]


def test_ids_wrap_around_skipping_those_in_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(l7filters, "MAX_ID", 3)
    table = FilterTable(tmp_path / "filters.json")
    assert numbers(table, filt("/1"), filt("/2"), filt("/3")) == [1, 2, 3]
    table.retire({1, 3})
    assert numbers(table, filt("/4")) == [2]  # after 3 comes 1 (in use), then 2
    with pytest.raises(CellgateError, match="more than 3"):
        numbers(table, filt("/5"))
    table.retire({2, 3})
    assert numbers(table, filt("/5")) == [1]


# -- 3. PolicyState on the fake kernel ----------------------------------------------------------------


class Node:
    """A PolicyState over the fake kernel with two endpoints, web and db, and a filters file."""

    def __init__(self, path: Path, kernel: FakeKernel | None = None, identities: Identities | None = None) -> None:
        self.path = path
        self.kernel = kernel or FakeKernel()
        self.identities = identities or Identities(MemoryStore())
        self.state = PolicyState(self.identities, Repository(MemoryStore()), self.kernel,
                                 filters=FilterTable(path))
        self.web = self._endpoint("web", 1)
        self.db = self._endpoint("db", 2)
        self.endpoints = [self.web, self.db]

    def _endpoint(self, app: str, n: int) -> Endpoint:
        labels = L(f"app={app}")
        number = self.identities.acquire(labels, f"ep-{app}")
        return Endpoint(f"ep-{app}", "net", f"cg{app}", f"tmp{app}", f"02:42:0a:00:00:{n:02x}",
                        f"02:42:0a:00:01:{n:02x}", labels=tuple(sorted(str(x) for x in labels)), identity=number,
                        labels_known=True)

    def import_(self, *raw: dict[str, Any]) -> int:
        return self.state.import_rules(parse_rules(list(raw)), self.endpoints)

    def l7_entries(self) -> dict[PolicyKey, PolicyValue]:
        return {k: v for k, v in self.kernel.policy.items() if v.l7}


def test_an_imported_l7_rule_writes_numbered_entries_and_the_file_first(tmp_path: Path) -> None:
    node = Node(tmp_path / "filters.json")
    node.state.sync(node.endpoints)
    seen: list[tuple[set[int], set[int]]] = []  # (numbers written, numbers on file then)
    update = node.kernel.policy_update

    def policy_update(upserts: dict[PolicyKey, PolicyValue], deletes: Any) -> None:
        on = set(on_file(node.path)) if node.path.exists() else set()
        seen.append(({v.l7 for v in upserts.values() if v.l7}, on))
        update(upserts, deletes)

    node.kernel.policy_update = policy_update  # type: ignore[method-assign]
    node.import_(rule("l7", rules=http("/a")))
    [(subject_key, value)] = node.l7_entries().items()
    assert (subject_key.subject, subject_key.peer, subject_key.port) == (node.web.identity, node.db.identity, 80)
    assert value.l7 != 0
    assert node.kernel.policy == node.state.applied
    [rule_in_force] = node.state.repository.snapshot()[1]
    assert on_file(node.path) == {value.l7: L7Filter("http", (Grant(rule_in_force.id, "name=l7",
                                                                    http=(HttpRule("GET", "/a"),)),))}
    assert seen and all(written <= on for written, on in seen), "an entry named a filter the file did not have"


def test_deleting_the_rule_retires_its_number_from_the_file(tmp_path: Path) -> None:
    node = Node(tmp_path / "filters.json")
    node.import_(rule("l7", rules=http("/a")), rule("other", peer=None, ports=[{"port": "81", "protocol": "TCP"}]))
    [number] = {v.l7 for v in node.l7_entries().values()}
    assert number in on_file(node.path)
    node.state.delete_rules([Label("unspec", "name", "l7")], node.endpoints)
    assert node.l7_entries() == {}
    assert on_file(node.path) == {}
    assert node.state.filters.by_id == {}


def test_a_restart_keeps_the_numbers_and_writes_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path / "filters.json")
    node.import_(rule("a", rules=http("/a")), rule("b", peer=None, rules=http("/b")))
    before = dict(node.kernel.policy)
    numbers_before = {k: v.l7 for k, v in before.items()}
    # the agent restarts: a new table reads the file, the state reads the pinned map
    again = PolicyState(node.identities, node.state.repository, node.kernel, filters=FilterTable(node.path))
    again.load()
    report = again.sync(node.endpoints)
    assert (report.upserts, report.deletes) == (0, 0)
    assert {k: v.l7 for k, v in node.kernel.policy.items()} == numbers_before


def test_a_rule_changing_the_l7_rules_of_an_entry_renumbers_it(tmp_path: Path) -> None:
    node = Node(tmp_path / "filters.json")
    node.import_(rule("a", rules=http("/a")))
    [old] = {v.l7 for v in node.l7_entries().values()}
    node.import_(rule("b", rules=http("/b")))
    [new] = {v.l7 for v in node.l7_entries().values()}
    assert new != old
    assert list(on_file(node.path)) == [new]
    assert rules_of(on_file(node.path)[new]) == [1, 2]


def test_conflicting_http_and_kafka_rules_are_refused_and_change_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path / "filters.json")
    node.import_(rule("web", rules=http("/a")))
    before = (dict(node.kernel.policy), node.path.read_text(), node.state.repository.snapshot())
    with pytest.raises(InvalidRequest, match="one L7 protocol"):
        node.import_(rule("kafka", peer=None, rules=KAFKA))
    with pytest.raises(InvalidRequest, match="one L7 protocol"):  # within one import too
        node.import_(rule("h", ports=[{"port": "8080", "protocol": "TCP"}], rules=http("/a")),
                     rule("k", ports=[{"port": "8080", "protocol": "TCP"}], rules=KAFKA))
    assert (dict(node.kernel.policy), node.path.read_text(), node.state.repository.snapshot()) == before


# -- 4. trace with a request --------------------------------------------------------------------------


WEB_P = Party(WEB, IDENTITIES[WEB], True)
DB_P = Party(DB, IDENTITIES[DB], True)
CACHE_P = Party(CACHE, IDENTITIES[CACHE], True)
PUBLIC = rule("public", rules={"http": [{"method": "GET", "path": "/public(/.*)?"}]})


def traced(rules: list[dict[str, Any]], request: HttpRequest | KafkaRequest | None, src: Party = DB_P,
           dst: Party = WEB_P, port: int = 80) -> Any:
    return trace(numbered(*rules), IDENTITIES, "default", src, dst, TCP, port, request)


def test_trace_of_an_allowed_request_names_the_rule() -> None:
    result = traced([PUBLIC], get("/public/x"))
    assert result.allowed
    assert result.l7_ingress is not None and result.l7_ingress.allowed and result.l7_ingress.rule == 1
    assert result.l7_egress is None  # db's egress has no rules
    assert "  Ingress L7: the flow goes through the proxy (http rules of rule 1)" in result.lines
    assert "  Ingress L7 verdict: ALLOWED by rule 1" in result.lines
    assert result.lines[-1] == "Final verdict: ALLOWED"


def test_trace_of_a_denied_path_is_denied_and_explains_why() -> None:
    result = traced([PUBLIC], get("/private"))
    assert result.ingress is not None and result.ingress.allowed  # L4 lets the flow in ...
    assert not result.allowed  # ... the proxy refuses the request
    assert result.l7_ingress is not None and not result.l7_ingress.allowed and result.l7_ingress.rule == 0
    assert any('path "/private" does not match' in line and "rule 1" in line for line in result.lines)
    assert "    no L7 rule allows this request" in result.lines
    assert "  Ingress L7 verdict: DENIED (no L7 rule allows it)" in result.lines
    assert result.lines[-1] == "Final verdict: DENIED"


def test_trace_without_a_request_says_the_rules_decide_every_request() -> None:
    result = traced([PUBLIC], None)
    assert result.allowed and result.l7_ingress is None
    assert any(line.strip().startswith("no request given") and line.endswith("every request is decided by these rules")
               for line in result.lines)


def test_trace_of_a_port_without_l7_rules_says_nothing_of_the_proxy() -> None:
    result = traced([PUBLIC, rule("ssh", ports=[{"port": "22", "protocol": "TCP"}])], get("/private"), port=22)
    assert result.allowed and result.l7_ingress is None
    assert not any("L7" in line for line in result.lines)


def test_trace_applies_the_wildcard_peer_s_rules_to_a_specific_peer() -> None:
    rules = [PUBLIC, rule("health", peer=None, rules=http("/healthz"))]
    result = traced(rules, get("/healthz"))
    assert result.allowed and result.l7_ingress is not None and result.l7_ingress.rule == 2
    assert not traced(rules, get("/public"), src=CACHE_P).allowed  # cache has only the wildcard's


def test_trace_of_egress_l7_rules() -> None:
    rules = [rule("out", egress=True, rules=http("/api"))]
    allowed = traced(rules, get("/api"), src=WEB_P, dst=DB_P)
    assert allowed.allowed and allowed.l7_egress is not None and allowed.l7_egress.rule == 1
    assert "  Egress L7 verdict: ALLOWED by rule 1" in allowed.lines
    denied = traced(rules, get("/other"), src=WEB_P, dst=DB_P)
    assert not denied.allowed and denied.l7_egress is not None and not denied.l7_egress.allowed


def test_trace_of_a_kafka_request() -> None:
    rules = [rule("kafka", ports=[{"port": "9092", "protocol": "TCP"}], rules={"kafka": [{"role": "produce",
                                                                                          "topic": "orders"}]})]
    ok = traced(rules, KafkaRequest(0, 9, "app", ("orders",)), port=9092)
    assert ok.allowed and ok.l7_ingress is not None and ok.l7_ingress.rule == 1
    other = traced(rules, KafkaRequest(0, 9, "app", ("payments",)), port=9092)
    assert not other.allowed
    http_on_kafka = traced(rules, get("/"), port=9092)
    assert not http_on_kafka.allowed
    assert any("not http" in line for line in http_on_kafka.lines)


def test_trace_of_http_and_kafka_on_one_port_says_every_request_is_denied() -> None:
    result = traced([rule("h", rules=http("/a")), rule("k", rules=KAFKA)], get("/a"))
    assert not result.allowed
    assert any("denies every request" in line for line in result.lines)


def body(**l7: Any) -> dict[str, Any]:
    return {"src": {"labels": "app=db"}, "dst": {"labels": "app=web"}, "dport": "80/tcp", **l7}


def test_a_dot_dot_path_is_traced_as_the_path_it_reaches() -> None:
    parsed = TraceRequest.parse(body(http={"method": "get", "path": "/public/x/../../private"}))
    assert parsed.request == HttpRequest("GET", "/private", "", ())
    result = traced([PUBLIC], parsed.request)
    assert not result.allowed
    assert any('path "/private" does not match' in line for line in result.lines)
    assert traced([PUBLIC], TraceRequest.parse(body(http={"path": "/private/../public/x"})).request).allowed


@pytest.mark.parametrize(("target", "normal"), [
    ("/", "/"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/../a", "/a"),
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/", "/a/"),
    ("//a//b", "/a/b"),
    ("/public/x/../../private", "/private"),
    ("/%61%62", "/ab"),
    ("/%7e%7E", "/~~"),
    ("/A%2Db", "/A-b"),
    ("/%2e%2e/x", "/x"),
    ("/a/%2E/b", "/a/b"),
    ("/%2F", "/%2F"),  # a reserved character stays encoded
    ("/%zz", "/%zz"),
    ("/a%", "/a%"),
    ("/a?x=/../y", "/a?x=/../y"),  # the query is kept as sent
    ("/a/../b?q=%61", "/b?q=%61"),
    ("/a?", "/a?"),
    ("*", "*"),
])
def test_normalize_path(target: str, normal: str) -> None:
    assert normalize_path(target) == normal
    assert normalize_path(normal) == normal  # normal paths are fixed points


# -- 5. the trace request at the door -----------------------------------------------------------------


def test_trace_request_parses_http_and_kafka() -> None:
    h = TraceRequest.parse(body(http={"method": "post", "path": "/a", "host": "web",
                                      "headers": ["X-Token: 1", "X-Flag"]}))
    assert h.request == HttpRequest("POST", "/a", "web", (("X-Token", "1"), ("X-Flag", "")))
    assert TraceRequest.parse(body(http={"headers": None})).request == HttpRequest("GET", "/", "", ())
    k = TraceRequest.parse(body(kafka={"apiKey": "Fetch", "apiVersion": 12, "clientID": "c", "topics": ["t"]}))
    assert k.request == KafkaRequest(1, 12, "c", ("t",))
    assert TraceRequest.parse(body(kafka={"apiKey": "3"})).request == KafkaRequest(3, 0, None, ())
    assert TraceRequest.parse(body(kafka={"apiKey": 71})).request == KafkaRequest(71, 0, None, ())
    # every apiKey name a rule takes can be traced by name
    for name, number in (("describegroups", 15), ("offsetforleaderepoch", 23), ("initproducerid", 22)):
        assert TraceRequest.parse(body(kafka={"apiKey": name})).request == KafkaRequest(number, 0, None, ())
    assert TraceRequest.parse(body()).request is None


BAD = {
    "both http and kafka": body(http={"path": "/"}, kafka={"apiKey": "produce"}),
    "http not an object": body(http=["GET", "/"]),
    "unknown http field": body(http={"url": "/"}),
    "headers a string": body(http={"headers": "X-A: 1"}),
    "headers an object": body(http={"headers": {"X-A": "1"}}),
    "headers empty string": body(http={"headers": ""}),
    "header not a string": body(http={"headers": [{"name": "X-A"}]}),
    "header without a name": body(http={"headers": [": value"]}),
    "header of spaces": body(http={"headers": ["   "]}),
    "too many headers": body(http={"headers": [f"X-{i}: v" for i in range(101)]}),
    "relative path": body(http={"path": "public"}),
    "empty path": body(http={"path": ""}),
    "absolute-form path": body(http={"path": "http://web/a"}),
    "path not a string": body(http={"path": 1}),
    "method not a string": body(http={"method": None}),
    "kafka not an object": body(kafka="produce"),
    "unknown kafka field": body(kafka={"topic": "t"}),
    "unknown apiKey name": body(kafka={"apiKey": "publish"}),
    "empty apiKey": body(kafka={"apiKey": ""}),
    "apiKey unicode digits": body(kafka={"apiKey": "²"}),
    "apiKey number too big": body(kafka={"apiKey": 40000}),
    "apiKey digits too big": body(kafka={"apiKey": "99999"}),
    "apiKey negative": body(kafka={"apiKey": -1}),
    "apiKey bool": body(kafka={"apiKey": True}),
    "apiVersion bool": body(kafka={"apiVersion": True}),
    "apiVersion negative": body(kafka={"apiVersion": -1}),
    "apiVersion a string": body(kafka={"apiVersion": "3"}),
    "apiVersion too big": body(kafka={"apiVersion": 32768}),
    "topics a string": body(kafka={"topics": "orders"}),
    "topics an empty string": body(kafka={"topics": ""}),
    "topics an object": body(kafka={"topics": {}}),
    "topics not strings": body(kafka={"topics": ["orders", 1]}),
    "clientID not a string": body(kafka={"clientID": 7}),
}


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_bad_trace_requests_are_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        TraceRequest.parse(raw)
