"""One contract for every KVStore: tests/unit runs it on the in-memory fake, tests/e2e on real etcd,
so the fake stays honest. Each check takes a fresh store and a key prefix of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from plugin.kvstore.port import Compacted, Compare, Delete, Event, KVStore, KvstoreUnavailable, LeaseNotFound, Put


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def check_crud(store: KVStore, p: str) -> None:
    assert store.get(p + "a") is None
    rev = store.put(p + "a", b"1")
    kv = store.get(p + "a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev == kv.create_revision
    assert not store.create(p + "a", b"2") and store.create(p + "b", b"2")
    items, head = store.list(p)
    assert [(i.key, i.value) for i in items] == [(p + "a", b"1"), (p + "b", b"2")] and head >= rev
    assert store.delete(p + "b") and not store.delete(p + "b")


def check_txn(store: KVStore, p: str) -> None:
    store.put(p + "k", b"v")
    kv = store.get(p + "k")
    assert kv is not None
    assert store.txn([Compare(p + "k", "mod", "==", kv.mod_revision), Compare(p + "n", "create", "==", 0)],
                     [Put(p + "n", b"new"), Delete(p + "k")])
    assert store.get(p + "k") is None and store.get(p + "n") is not None
    assert not store.txn([Compare(p + "n", "value", "==", b"other")], [Delete(p + "n")], [Put(p + "f", b"x")])
    assert store.get(p + "n") is not None and store.get(p + "f") is not None


def check_lease(store: KVStore, p: str, let_time_pass: Callable[[float], None]) -> None:
    lease = store.grant(2)
    store.put(p + "leased", b"x", lease)
    assert store.keepalive(lease) == 2 and 0 <= store.lease_ttl(lease) <= 2
    store.revoke(lease)
    assert store.get(p + "leased") is None and store.lease_ttl(lease) == -1
    try:
        store.keepalive(lease)
        raise AssertionError("keepalive of a revoked lease")
    except LeaseNotFound:
        pass
    short = store.grant(1)
    store.put(p + "short", b"x", short)
    let_time_pass(1.2)
    _wait(lambda: store.get(p + "short") is None, 10)


def check_watch(store: KVStore, p: str) -> None:
    _, head = store.list(p)
    store.put(p + "before", b"1")  # after `head`: a watch from head+1 sees it
    got: list[Event] = []
    lock = threading.Lock()

    def sink(events: list[Event]) -> None:
        with lock:
            got.extend(events)

    w = store.watch(p, head + 1, sink)
    store.put(p + "x", b"2")
    store.delete(p + "x")
    _wait(lambda: len(got) >= 3)
    assert [(e.kind, e.key) for e in got] == [("put", p + "before"), ("put", p + "x"), ("delete", p + "x")]
    assert got[0].revision < got[1].revision < got[2].revision
    w.cancel()
    assert w.wait(5) and w.error is None


def check_compaction(store: KVStore, p: str) -> None:
    store.put(p + "c", b"1")
    first = store.put(p + "c", b"2")
    last = store.put(p + "c", b"3")
    store.compact(store.revision())
    w = store.watch(p, first, lambda events: None)
    assert w.wait(5)
    assert isinstance(w.error, Compacted)
    got: list[Event] = []
    w = store.watch(p, last, got.extend)  # the compact revision itself is kept
    _wait(lambda: bool(got))
    assert not w.wait(0)
    assert [(e.kind, e.value, e.revision) for e in got] == [("put", b"3", last)]
    w.cancel()
    with pytest.raises(Compacted):
        store.compact(last)


def check_keys_and_versions(store: KVStore, p: str) -> None:
    store.put(p + "b", b"2")
    store.put(p + "a", b"1")
    store.put(p[:-1] + "x/other", b"outside")  # a sibling prefix is not listed
    items, _ = store.list(p)
    assert [i.key for i in items] == [p + "a", p + "b"]
    store.put(p + "a", b"1bis")
    assert store.txn([Compare(p + "a", "version", "==", 2), Compare(p + "a", "value", "!=", b"1")],
                     [Put(p + "a", b"v3")])
    assert not store.txn([Compare(p + "a", "version", ">", 3)], [Put(p + "a", b"no")])
    kv = store.get(p + "a")
    assert kv is not None and kv.value == b"v3" and kv.create_revision < kv.mod_revision
    assert store.txn([Compare(p + "gone", "version", "==", 0), Compare(p + "a", "mod", "<", kv.mod_revision + 1)],
                     [Delete(p + "a"), Delete(p + "b")])
    assert store.list(p)[0] == []


def check_lease_errors(store: KVStore, p: str) -> None:
    missing = 0x7EADBEEF
    with pytest.raises(LeaseNotFound):
        store.put(p + "k", b"x", missing)
    with pytest.raises(LeaseNotFound):
        store.keepalive(missing)
    assert store.lease_ttl(missing) == -1
    store.revoke(missing)  # revoking what is gone succeeds
    lease = store.grant(30)
    store.put(p + "k", b"x", lease)
    kv = store.get(p + "k")
    assert kv is not None and kv.lease == lease
    store.put(p + "k", b"y")  # a put without the lease detaches the key
    store.revoke(lease)
    kv = store.get(p + "k")
    assert kv is not None and kv.value == b"y" and kv.lease == 0


def check_watch_sees_lease_expiry(store: KVStore, p: str, let_time_pass: Callable[[float], None]) -> None:
    got: list[Event] = []
    w = store.watch(p, store.revision() + 1, got.extend)
    lease = store.grant(1)
    store.put(p + "l1", b"x", lease)
    store.put(p + "l2", b"y", lease)
    let_time_pass(1.2)
    _wait(lambda: store.get(p + "l1") is None and len(got) >= 4, 10)  # get: lazy stores expire on a call
    assert [(e.kind, e.key) for e in got] == [("put", p + "l1"), ("put", p + "l2"),
                                              ("delete", p + "l1"), ("delete", p + "l2")]
    assert got[2].revision == got[3].revision > got[1].revision  # one revision for the expiry
    w.cancel()


def check_unavailable(store: KVStore, p: str, take_down: Callable[[], None], bring_back: Callable[[], None],
                      timeout: float) -> None:
    """While the store is away every call raises KvstoreUnavailable within its timeout (never hangs),
    a running watch ends with KvstoreUnavailable, and the same client works again once it is back."""
    store.put(p + "u", b"1")
    w = store.watch(p, store.revision() + 1, lambda events: None)
    take_down()
    assert w.wait(timeout + 5) and isinstance(w.error, KvstoreUnavailable)
    calls: list[Callable[[], object]] = [lambda: store.get(p + "u"), lambda: store.list(p),
                                         lambda: store.put(p + "u", b"2"), lambda: store.grant(5),
                                         store.revision]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(KvstoreUnavailable):
            call()
        assert time.monotonic() - started < timeout + 1.0
    bring_back()
    _wait(lambda: _answers(store), timeout + 10)
    kv = store.get(p + "u")
    assert kv is not None and kv.value == b"1"


def _answers(store: KVStore) -> bool:
    try:
        store.revision()
    except KvstoreUnavailable:
        return False
    return True
