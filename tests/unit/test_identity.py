"""datapath.identity: reserved numbers, the allocator, its persistence and ownership."""

from __future__ import annotations

import pytest

from datapath import identity as ids
from datapath.errors import AddressExhausted, StateError
from datapath.identity import Identities
from datapath.labels import Label, LabelSet, from_runtime
from datapath.store import MemoryStore


def lbls(**kv: str) -> LabelSet:
    return from_runtime(kv, "container")


WEB, DB, CACHE = lbls(app="web"), lbls(app="db"), lbls(app="cache")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def idents(store: MemoryStore) -> Identities:
    return Identities(store)


def test_reserved_numbers_are_cilium_s_and_below_the_allocated_range() -> None:
    assert (ids.ANY, ids.HOST, ids.WORLD, ids.UNMANAGED, ids.HEALTH, ids.INIT, ids.REMOTE_NODE) == (0, 1, 2, 3, 4, 5, 6)
    assert ids.RESERVED_LABELS[ids.HOST] == {Label("reserved", "host")}
    assert ids.RESERVED_LABELS[ids.WORLD] == {Label("reserved", "world")}
    assert ids.RESERVED_LABELS[ids.INIT] == {Label("reserved", "init")}
    assert ids.RESERVED_LABELS[ids.UNMANAGED] == {Label("reserved", "unmanaged")}
    assert ids.RESERVED_LABELS[ids.REMOTE_NODE] == {Label("reserved", "remote-node")}
    assert max(ids.RESERVED) < ids.FIRST_ALLOCATED == 256 and ids.LAST_ALLOCATED == 65535
    assert set(ids.reserved_names()) == {"host", "world", "unmanaged", "health", "init", "remote-node"}
    assert ids.ANY not in ids.RESERVED  # 0 is the wildcard of policy keys, never an identity


def test_reserved_identities_are_known_without_allocation(idents: Identities) -> None:
    for number, labels in ids.RESERVED_LABELS.items():
        assert idents.labels_of(number) == labels
        assert idents.number_of(labels) == number
    assert idents.labels_of(ids.ANY) is None and idents.labels_of(256) is None
    assert idents.all() == ids.RESERVED_LABELS and idents.allocated() == []


def test_same_labels_same_number(idents: Identities) -> None:
    a = idents.acquire(WEB, "ep1")
    b = idents.acquire(lbls(app="web"), "ep2")
    c = idents.acquire(DB, "ep3")
    assert a == b != c
    assert ids.FIRST_ALLOCATED <= a <= ids.LAST_ALLOCATED and ids.FIRST_ALLOCATED <= c <= ids.LAST_ALLOCATED
    assert idents.labels_of(a) == WEB and idents.number_of(WEB) == a
    assert idents.number_of(CACHE) is None
    assert [(i.number, i.owners) for i in idents.allocated()] == sorted([(a, {"ep1", "ep2"}), (c, {"ep3"})])
    assert idents.all() == {**ids.RESERVED_LABELS, a: WEB, c: DB}


def test_acquiring_twice_for_one_owner_is_one_hold(idents: Identities) -> None:
    n = idents.acquire(WEB, "ep1")
    assert idents.acquire(WEB, "ep1") == n
    assert idents.release("ep1") == [n]
    assert idents.number_of(WEB) is None


def test_label_order_and_source_matter_as_a_set(idents: Identities) -> None:
    n = idents.acquire(frozenset({Label("container", "a", "1"), Label("container", "b", "2")}), "ep1")
    assert idents.acquire(frozenset({Label("container", "b", "2"), Label("container", "a", "1")}), "ep2") == n
    assert idents.acquire(frozenset({Label("mesos", "a", "1"), Label("mesos", "b", "2")}), "ep3") != n
    assert idents.acquire(frozenset(), "ep4") not in (n, ids.INIT)  # no labels at all is a label set too


def test_numbers_persist_across_a_new_allocator_on_the_same_store(store: MemoryStore, idents: Identities) -> None:
    web, db = idents.acquire(WEB, "ep1"), idents.acquire(DB, "ep2")
    idents.acquire(WEB, "ep3")
    reborn = Identities(store)
    assert reborn.number_of(WEB) == web and reborn.number_of(DB) == db
    # holders are written only with the number's birth; a restart rebuilds them from the endpoints
    assert [(i.number, i.labels, i.owners) for i in reborn.allocated()] == [
        (web, WEB, {"ep1"}), (db, DB, {"ep2"})]
    assert reborn.sync_owners({"ep1": WEB, "ep2": DB, "ep3": WEB}) == []
    assert [i.owners for i in reborn.allocated()] == [{"ep1", "ep3"}, {"ep2"}]
    assert reborn.acquire(CACHE, "ep4") not in (web, db)
    assert reborn.acquire(WEB, "ep5") == web


def test_documents_are_readable_and_bad_ones_are_skipped(store: MemoryStore, idents: Identities) -> None:
    n = idents.acquire(lbls(app="web", tier="front"), "ep1")
    assert store.docs[str(n)] == {"version": 1, "id": n, "labels": ["container:app=web", "container:tier=front"],
                                  "owners": ["ep1"]}
    store.docs["junk"] = {"id": "x", "labels": []}
    store.docs["nolabels"] = {"id": 300}
    store.docs["reserved"] = {"id": 1, "labels": ["container:app=evil"], "owners": ["x"]}
    store.docs["too-big"] = {"id": 70000, "labels": ["container:app=big"], "owners": ["x"]}
    reborn = Identities(store)
    assert [i.number for i in reborn.allocated()] == [n]
    assert reborn.labels_of(ids.HOST) == ids.RESERVED_LABELS[ids.HOST]


def test_release_frees_a_number_only_when_its_last_owner_goes(store: MemoryStore, idents: Identities) -> None:
    web, db = idents.acquire(WEB, "ep1"), idents.acquire(DB, "ep1")
    idents.acquire(WEB, "ep2")
    assert idents.release("ep1") == [db]  # web is still held by ep2
    assert idents.labels_of(db) is None and str(db) not in store.docs
    assert idents.labels_of(web) == WEB and str(web) in store.docs  # kept while anyone holds it
    assert idents.release("ep2") == [web]
    assert store.docs == {} and idents.allocated() == []
    assert idents.release("ep2") == [] and idents.release("never") == []


def test_release_one_drops_a_single_hold(idents: Identities) -> None:
    web, db = idents.acquire(WEB, "ep1"), idents.acquire(DB, "ep1")
    idents.acquire(WEB, "ep2")
    assert idents.release_one("ep1", web) is False  # ep2 still holds it
    assert [i.owners for i in idents.allocated()] == [{"ep2"}, {"ep1"}]
    assert idents.release_one("ep1", web) is False  # no longer held by ep1: nothing happens
    assert idents.release_one("ep1", 9999) is False
    assert idents.release_one("ep1", db) is True and idents.labels_of(db) is None
    assert idents.labels_of(web) == WEB


def test_numbers_are_not_reused_while_held(idents: Identities) -> None:
    held = {idents.acquire(lbls(n=str(i)), f"ep{i}") for i in range(20)}
    assert len(held) == 20
    for i in range(0, 20, 3):
        idents.release(f"ep{i}")
    still = {n for n in held if idents.labels_of(n) is not None}
    fresh = {idents.acquire(lbls(m=str(i)), f"new{i}") for i in range(40)}
    assert len(fresh) == 40 and not fresh & still
    assert all(ids.FIRST_ALLOCATED <= n <= ids.LAST_ALLOCATED for n in fresh)


def test_the_range_runs_out_with_a_clear_error(idents: Identities, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "LAST_ALLOCATED", ids.FIRST_ALLOCATED + 2)
    got = [idents.acquire(lbls(n=str(i)), "ep") for i in range(3)]
    assert sorted(got) == [256, 257, 258]
    with pytest.raises(AddressExhausted, match="identity"):
        idents.acquire(lbls(n="3"), "ep")
    idents.release_one("ep", 257)
    assert idents.acquire(lbls(n="3"), "ep") == 257  # wraps to the free number


def test_a_store_failure_changes_nothing(store: MemoryStore, idents: Identities) -> None:
    web = idents.acquire(WEB, "ep1")
    store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        idents.acquire(DB, "ep2")
    assert idents.number_of(DB) is None and len(store.docs) == 1
    store.fail_next = StateError("disk full")
    assert idents.acquire(WEB, "ep2") == web  # a new holder of a known number writes nothing
    assert store.fail_next is not None
    store.fail_next = None
    assert [i.owners for i in idents.allocated()] == [{"ep1", "ep2"}]
    assert idents.acquire(DB, "ep2") != web


def test_sync_owners_makes_ownership_match_the_live_endpoints(store: MemoryStore, idents: Identities) -> None:
    web, db = idents.acquire(WEB, "ep1"), idents.acquire(DB, "gone")
    idents.acquire(WEB, "gone")
    freed = idents.sync_owners({"ep1": WEB, "ep2": CACHE})
    assert freed == [db]
    cache = idents.number_of(CACHE)
    assert cache is not None and cache not in (web, db)
    assert {i.number: i.owners for i in idents.allocated()} == {web: {"ep1"}, cache: {"ep2"}}
    assert {i.number: i.owners for i in Identities(store).allocated()} == {web: {"ep1"}, cache: {"ep2"}}
    assert idents.sync_owners({"ep1": WEB, "ep2": CACHE}) == []  # already exact


def test_sync_owners_drops_a_live_owner_s_hold_on_labels_it_no_longer_has(idents: Identities) -> None:
    """A crash between acquiring an endpoint's new identity and releasing its old one leaves two holds."""
    old, new = idents.acquire(WEB, "ep1"), idents.acquire(DB, "ep1")
    assert idents.sync_owners({"ep1": DB}) == [old]
    assert {i.number: i.owners for i in idents.allocated()} == {new: {"ep1"}}
