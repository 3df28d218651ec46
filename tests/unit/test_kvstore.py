"""The kvstore contract on the in-memory fake, and the loops on top of it (list-watch, session)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from plugin.kvstore.listwatch import ListWatcher
from plugin.kvstore.memory import MemoryStore
from plugin.kvstore.port import KvstoreUnavailable
from plugin.kvstore.session import Session
from tests.contract import kvstore_port as contract
from tests.unit.test_cluster_service import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock)


@pytest.mark.parametrize("check", [contract.check_crud, contract.check_txn, contract.check_watch,
                                   contract.check_compaction])
def test_contract(store: MemoryStore, check: object) -> None:
    check(store, "cgt/")  # type: ignore[operator]


def test_contract_lease(store: MemoryStore, clock: Clock) -> None:
    def later(seconds: float) -> None:
        clock.now += seconds

    contract.check_lease(store, "cgt/", later)


def test_unavailable_raises(store: MemoryStore) -> None:
    store.set_available(False)
    with pytest.raises(KvstoreUnavailable):
        store.get("x")


class Recorder:
    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.syncs = 0

    def upsert(self, key: str, value: bytes) -> None:
        if value == b"boom":
            raise RuntimeError("handler bug")
        self.items[key] = value

    def delete(self, key: str) -> None:
        self.items.pop(key, None)

    def synced(self) -> None:
        self.syncs += 1


def test_listwatch_relists_after_compaction_wipe_and_outage(store: MemoryStore) -> None:
    store.put("p/a", b"1")
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, backoff=(0.01, 0.05))
    stop = threading.Event()
    t = threading.Thread(target=lw.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert lw.wait_synced(5)
        store.put("p/b", b"boom")  # a handler error is logged; the loop goes on
        store.put("p/c", b"3")
        wait_for(lambda: rec.items.get("p/c") == b"3")
        store.cancel_watches()
        store.put("p/d", b"4")
        wait_for(lambda: "p/d" in rec.items)
        store.wipe()  # restarted empty: every cached key is deleted by the re-list
        store.put("p/e", b"5")
        wait_for(lambda: set(rec.items) == {"p/e"})
        store.set_available(False)
        wait_for(lambda: not lw.connected)
        store.set_available(True)
        store.put("p/f", b"6")
        wait_for(lambda: "p/f" in rec.items)
        assert lw.relists >= 3 and rec.syncs >= 4
    finally:
        stop.set()
        t.join(5)


def test_session_reuses_a_live_lease_and_replaces_a_lost_one(store: MemoryStore, tmp_path: Path) -> None:
    lease_file = tmp_path / "lease"
    first = Session(store, 10, lease_file)
    lease = first.start()
    assert lease_file.stat().st_mode & 0o777 == 0o600
    again = Session(store, 10, lease_file)
    assert again.start() == lease  # a restart within the TTL keeps the lease
    news: list[int] = []
    s = Session(store, 3, lease_file, news.append)
    s.start()
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,), daemon=True)
    t.start()
    try:
        store.revoke(lease)  # lost (etcd restarted empty, or an outage past the TTL)
        wait_for(lambda: news, timeout=10)
        assert news[0] != lease and s.lease_id == news[0] and store.lease_ttl(news[0]) > 0
    finally:
        stop.set()
        t.join(5)
