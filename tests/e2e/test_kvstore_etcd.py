"""The kvstore contract and its fault cases against a real etcd (Debian's etcd-server), started by
the tests with their own data directories and free ports, and stopped by PID."""

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
from tests.etcd_server import EtcdServer, free_port
from tests.kernel.helpers import wait_until
from tests.unit.test_kvstore_listwatch import Recorder


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore([etcd.url], timeout=1.0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared(etcd_module: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore([etcd_module.url], timeout=1.0)
    yield s
    s.close()


@pytest.mark.parametrize("check", [contract.check_crud, contract.check_txn, contract.check_watch,
                                   contract.check_compaction, contract.check_keys_and_versions,
                                   contract.check_lease_errors])
def test_contract(shared: EtcdStore, check: object, request: pytest.FixtureRequest) -> None:
    check(shared, f"cgt/{request.node.callspec.id}/")  # type: ignore[operator]


def test_contract_lease(shared: EtcdStore) -> None:
    contract.check_lease(shared, "cgt/lease/", lambda seconds: None)  # real time: the check waits


def test_contract_watch_sees_lease_expiry(shared: EtcdStore) -> None:
    contract.check_watch_sees_lease_expiry(shared, "cgt/expiry/", lambda seconds: None)


def test_contract_unavailable(etcd: EtcdServer, store: EtcdStore) -> None:
    contract.check_unavailable(store, "cgt/", etcd.stop, etcd.start, timeout=store.timeout)


def test_bad_endpoints_are_refused() -> None:
    for url in ("https://127.0.0.1:2379", "127.0.0.1:2379", "http://h:99999", "http://h:1/x"):
        with pytest.raises(KvstoreError, match="not http://HOST:PORT"):
            EtcdStore([url])
    with pytest.raises(KvstoreError, match="no kvstore endpoint"):
        EtcdStore([])


def test_nothing_listening_fails_within_the_timeout() -> None:
    s = EtcdStore([f"http://127.0.0.1:{free_port()}"], timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(KvstoreUnavailable):
            s.put("cgt/x", b"1")
        assert time.monotonic() - started < 1.5
    finally:
        s.close()


def test_a_dead_endpoint_is_skipped_within_one_call(etcd_module: EtcdServer) -> None:
    s = EtcdStore([f"http://127.0.0.1:{free_port()}", etcd_module.url], timeout=1.0)
    try:
        assert s.put("cgt/failover", b"1") > 0  # the first endpoint refused; the second answered
        assert s.endpoint == etcd_module.url.removeprefix("http://")
    finally:
        s.close()


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
        wait_until(lambda: "cgt/x" in rec.items)
        syncs = rec.syncs
        etcd.restart(empty=True)
        wait_until(lambda: "cgt/x" not in rec.items, timeout=15)  # a synthesised delete on re-list
        assert ("delete", "cgt/x") in rec.log and rec.syncs > syncs and lw.relists >= 1
        wait_until(lambda: bool(news), timeout=15)  # the lease vanished with the data
        assert news[0] != lease and session.lease_id == news[0] and store.lease_ttl(news[0]) > 0
        store.put("cgt/y", b"2", session.lease_id)
        wait_until(lambda: "cgt/y" in rec.items)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
