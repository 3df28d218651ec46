"""The kvstore contract and its fault cases against a real etcd (Debian's etcd-server) that each test
starts with its own data directory and stops by PID."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.kvstore.etcd import EtcdStore
from plugin.kvstore.listwatch import ListWatcher
from plugin.kvstore.port import KvstoreError, KvstoreUnavailable
from plugin.kvstore.session import Session
from tests.contract import kvstore_port as contract
from tests.etcd_server import EtcdServer
from tests.unit.test_cluster_service import wait_for
from tests.unit.test_kvstore import Recorder


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore([etcd.url], timeout=1.0)
    yield s
    s.close()


@pytest.mark.parametrize("check", [contract.check_crud, contract.check_txn, contract.check_watch,
                                   contract.check_compaction])
def test_contract(store: EtcdStore, check: object) -> None:
    check(store, "cgt/")  # type: ignore[operator]


def test_contract_lease(store: EtcdStore) -> None:
    contract.check_lease(store, "cgt/", lambda seconds: None)  # real time: the check waits for expiry


def test_bad_endpoints_are_refused() -> None:
    for url in ("https://127.0.0.1:2379", "127.0.0.1:2379", "http://h:99999"):
        with pytest.raises(KvstoreError, match="not http://HOST:PORT"):
            EtcdStore([url])


def test_stopped_etcd_fails_fast_and_recovers(etcd: EtcdServer, store: EtcdStore) -> None:
    store.put("cgt/a", b"1")
    w = store.watch("cgt/", 1, lambda events: None)
    etcd.stop()
    assert w.wait(5) and isinstance(w.error, KvstoreUnavailable)
    started = time.monotonic()
    with pytest.raises(KvstoreUnavailable):
        store.get("cgt/a")
    assert time.monotonic() - started < 3
    etcd.start()
    kv = store.get("cgt/a")
    assert kv is not None and kv.value == b"1"


def test_restarted_empty_relists_and_the_session_regrants(etcd: EtcdServer, store: EtcdStore,
                                                           tmp_path: Path) -> None:
    news: list[int] = []
    session = Session(store, 3, tmp_path / "lease", news.append)
    lease = session.start()
    assert Session(store, 3, tmp_path / "lease").start() == lease  # reused while alive
    store.put("cgt/x", b"1", lease)
    rec = Recorder()
    lw = ListWatcher(store, "cgt/", rec, backoff=(0.05, 0.2))
    stop = threading.Event()
    threads = [threading.Thread(target=lw.run, args=(stop,), daemon=True),
               threading.Thread(target=session.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: "cgt/x" in rec.items)
        etcd.restart(empty=True)
        wait_for(lambda: "cgt/x" not in rec.items, timeout=15)  # synthesised delete on re-list
        wait_for(lambda: bool(news), timeout=15)
        assert news[0] != lease
        store.put("cgt/y", b"2", session.lease_id)
        wait_for(lambda: "cgt/y" in rec.items)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
