"""ListWatcher (list, then watch, re-list on any end) and Session (the node's lease) against the
in-memory kvstore fake."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from plugin.kvstore.listwatch import ListWatcher
from plugin.kvstore.memory import MemoryStore
from plugin.kvstore.port import Event, KvstoreUnavailable, Watch
from plugin.kvstore.session import Session
from tests.kernel.helpers import wait_until
from tests.unit.test_kvstore import Clock


class Recorder:
    """A handler that records the state it was told about; the value b"boom" makes it fail."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        self.syncs = 0
        self.lock = threading.Lock()

    def upsert(self, key: str, value: bytes) -> None:
        with self.lock:
            self.log.append(("upsert", key))
        if value == b"boom":
            raise RuntimeError("handler bug")
        self.items[key] = value

    def delete(self, key: str) -> None:
        with self.lock:
            self.log.append(("delete", key))
        self.items.pop(key, None)

    def synced(self) -> None:
        self.syncs += 1


@contextmanager
def running(target: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=target, args=(stop,), daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(5)
        assert not t.is_alive(), "the loop did not stop"


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_lists_then_watches_without_repeating(store: MemoryStore) -> None:
    store.put("p/a", b"1")
    store.put("q/other", b"x")
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, name="test", backoff=(0.01, 0.05))
    assert not lw.synced_once
    with running(lw.run):
        assert lw.wait_synced(5) and lw.synced_once and lw.connected
        assert rec.items == {"p/a": b"1"} and rec.syncs == 1
        store.put("p/b", b"2")
        store.delete("p/a")
        wait_until(lambda: rec.items == {"p/b": b"2"})
        assert lw.revision == store.revision()
        store.cancel_watches()  # re-list: nothing changed, so nothing is dispatched again
        wait_until(lambda: rec.syncs == 2)
        assert rec.log == [("upsert", "p/a"), ("upsert", "p/b"), ("delete", "p/a")]
        assert lw.relists == 1 and lw.last_error == ""  # cleared by the successful re-list


class CompactBeforeWatch(MemoryStore):
    """Compaction racing the list: the first watch starts at a compacted revision."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    def watch(self, prefix: str, start_revision: int, on_events: Callable[[list[Event]], None]) -> Watch:
        if not self.raced:
            self.raced = True
            self.put("p/late", b"9")
            self.delete("p/a")
            self.put("p/pad", b"0")
            self.compact(self.revision())
        return super().watch(prefix, start_revision, on_events)


def test_compacted_start_revision_relists_and_synthesises_deletes() -> None:
    store = CompactBeforeWatch()
    store.put("p/a", b"1")
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, backoff=(0.01, 0.05))
    with running(lw.run):
        wait_until(lambda: rec.syncs >= 2)
        assert rec.items == {"p/late": b"9", "p/pad": b"0"}  # p/a: a delete made up by the re-list
        assert ("delete", "p/a") in rec.log and lw.relists >= 1
        store.put("p/after", b"1")
        wait_until(lambda: "p/after" in rec.items)


def test_store_restarted_empty(store: MemoryStore) -> None:
    store.put("p/a", b"old")
    store.put("p/b", b"old")
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, backoff=(0.2, 0.2))
    with running(lw.run):
        assert lw.wait_synced(5)
        store.wipe()
        store.put("p/a", b"new")  # the same small revision as before, another value
        wait_until(lambda: rec.items == {"p/a": b"new"})
        assert lw.revision == store.revision()


def test_handler_errors_never_end_the_loop(store: MemoryStore) -> None:
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, backoff=(0.01, 0.05))
    store.put("p/bad", b"boom")
    with running(lw.run):
        assert lw.wait_synced(5)
        store.put("p/bad2", b"boom")
        store.put("p/good", b"1")
        wait_until(lambda: rec.items.get("p/good") == b"1")
        assert lw.connected and lw.relists == 0


def test_unavailable_then_reconnects(store: MemoryStore) -> None:
    store.put("p/a", b"1")
    rec = Recorder()
    lw = ListWatcher(store, "p/", rec, backoff=(0.01, 0.05))
    with running(lw.run):
        assert lw.wait_synced(5)
        store.set_available(False)
        wait_until(lambda: not lw.connected)
        assert "unavailable" in lw.last_error or "lost" in lw.last_error
        relists = lw.relists
        wait_until(lambda: lw.relists > relists + 2)  # keeps trying, backing off
        store.set_available(True)
        store.put("p/b", b"2")
        wait_until(lambda: lw.connected and "p/b" in rec.items)
        assert lw.last_error == ""


def test_stop_ends_the_loop_while_the_store_is_away(store: MemoryStore) -> None:
    store.set_available(False)
    lw = ListWatcher(store, "p/", Recorder(), backoff=(5.0, 5.0))
    with running(lw.run):
        wait_until(lambda: lw.last_error != "")
    assert not lw.synced_once and not lw.wait_synced(0)


# -- Session -------------------------------------------------------------------------------------


def test_session_reuses_a_live_lease_else_grants(store: MemoryStore, tmp_path: Path) -> None:
    lease_file = tmp_path / "state" / "lease"
    first = Session(store, 10, lease_file)
    lease = first.start()
    assert first.lease_id == lease and first.healthy and 0 < first.ttl_left() <= 10
    assert lease_file.stat().st_mode & 0o777 == 0o600 and int(lease_file.read_text(), 16) == lease
    assert Session(store, 10, lease_file).start() == lease  # a restart within the TTL keeps it
    store.revoke(lease)
    other = Session(store, 10, lease_file).start()
    assert other != lease and int(lease_file.read_text(), 16) == other
    lease_file.write_text("garbage\n")
    assert Session(store, 10, lease_file).start() not in (0, other)
    assert Session(store, 10).start() > 0  # no file: always a new lease


def test_session_start_raises_when_the_store_is_away(store: MemoryStore) -> None:
    store.set_available(False)
    s = Session(store, 10)
    with pytest.raises(KvstoreUnavailable):
        s.start()
    assert not s.healthy and s.ttl_left() == -1


def test_session_keeps_the_lease_alive() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    s = Session(store, 1)  # keepalive every 0.33 s of real time; the store's clock moves by hand
    lease = s.start()
    with running(s.run):
        for _ in range(5):  # 3 s of store time in all: only keepalives keep the 1 s lease
            clock.later(0.6)
            wait_until(lambda: store.lease_ttl(lease) == 1)  # refreshed (0 right after the jump)
    assert s.lease_id == lease and s.healthy


def test_session_regrants_after_loss_and_outage(store: MemoryStore, tmp_path: Path) -> None:
    lease_file = tmp_path / "lease"
    news: list[int] = []
    s = Session(store, 3, lease_file, news.append)
    lease = s.start()
    store.put("p/mine", b"x", lease)
    with running(s.run):
        store.revoke(lease)  # lost (etcd restarted empty, or an outage past the TTL)
        wait_until(lambda: news, timeout=10)
        assert news[0] != lease and s.lease_id == news[0] and store.lease_ttl(news[0]) > 0
        assert int(lease_file.read_text(), 16) == news[0]
        store.set_available(False)
        wait_until(lambda: not s.healthy, timeout=5)
        store.wipe()
        store.set_available(True)
        wait_until(lambda: len(news) == 2, timeout=5)
        assert s.healthy and store.lease_ttl(news[1]) > 0


def test_session_revoke_deletes_its_keys(store: MemoryStore) -> None:
    s = Session(store, 10)
    lease = s.start()
    store.put("p/mine", b"x", lease)
    s.revoke()
    assert s.lease_id == 0 and store.get("p/mine") is None and store.lease_ttl(lease) == -1
