"""The kvstore contract (tests/contract/kvstore_port.py) on the in-memory fake, and the fake's own
test controls (unavailable, server cancel, restarted empty)."""

from __future__ import annotations

import pytest

from plugin.kvstore.memory import MemoryStore
from plugin.kvstore.port import Event, KvstoreError, KvstoreUnavailable
from tests.contract import kvstore_port as contract
from tests.kernel.helpers import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def later(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock)


@pytest.mark.parametrize("check", [contract.check_crud, contract.check_txn, contract.check_watch,
                                   contract.check_compaction, contract.check_keys_and_versions,
                                   contract.check_lease_errors])
def test_contract(store: MemoryStore, check: object) -> None:
    check(store, "cgt/")  # type: ignore[operator]


def test_contract_lease(store: MemoryStore, clock: Clock) -> None:
    contract.check_lease(store, "cgt/", clock.later)


def test_contract_watch_sees_lease_expiry(store: MemoryStore, clock: Clock) -> None:
    contract.check_watch_sees_lease_expiry(store, "cgt/", clock.later)


def test_contract_unavailable(store: MemoryStore) -> None:
    contract.check_unavailable(store, "cgt/", lambda: store.set_available(False),
                               lambda: store.set_available(True), timeout=0.5)


def test_expire_without_a_call_emits_deletes(store: MemoryStore, clock: Clock) -> None:
    got: list[Event] = []
    store.watch("p/", store.revision() + 1, got.extend)
    lease = store.grant(5)
    store.put("p/a", b"1", lease)
    clock.later(4)
    assert store.keepalive(lease) == 5  # refreshed: lives 5 s from now
    clock.later(4)
    store.expire()
    assert store.get("p/a") is not None
    clock.later(1.5)
    store.expire()
    wait_until(lambda: len(got) == 2)
    assert [e.kind for e in got] == ["put", "delete"] and store.lease_ttl(lease) == -1


def test_failed_txn_applies_nothing(store: MemoryStore) -> None:
    from plugin.kvstore.port import LeaseNotFound, Put

    rev = store.revision()
    with pytest.raises(LeaseNotFound):
        store.txn([], [Put("p/a", b"1"), Put("p/b", b"2", lease=999)])
    assert store.get("p/a") is None and store.revision() == rev


def test_server_cancel_and_wipe_end_watches(store: MemoryStore) -> None:
    store.put("p/a", b"1")
    lease = store.grant(10)
    w = store.watch("p/", 0, lambda events: None)
    store.cancel_watches()
    assert w.wait(1) and isinstance(w.error, KvstoreError) and "cancel" in str(w.error)
    w = store.watch("p/", 0, lambda events: None)
    store.wipe()
    assert w.wait(1) and isinstance(w.error, KvstoreUnavailable)
    assert store.get("p/a") is None and store.revision() == 1 and store.lease_ttl(lease) == -1
