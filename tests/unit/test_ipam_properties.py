"""Properties of the allocator under random request/release sequences, and under threads."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.errors import AddressExhausted, Conflict, InvalidRequest
from datapath.store import MemoryStore
from ipam.allocator import LOCAL_SPACE, HostRanges, Ipam, PoolRequest
from ipam.pool import KIND_ENDPOINT
from tests.unit.helpers import HOST_V4, HOST_V6, FakeClock, hexid

SUBNET = ipaddress.IPv4Network("10.9.0.0/28")  # .0 network, .1 gateway, .15 broadcast
SUBPOOLS = [None, ipaddress.IPv4Network("10.9.0.0/29"), ipaddress.IPv4Network("10.9.0.8/29")]
RANGES = HostRanges(HOST_V4, HOST_V6)

# ("req", None) asks for any address, ("req", k) for SUBNET's k-th address, ("rel", k) releases one.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("req"), st.none()),
        st.tuples(st.just("req"), st.integers(0, 17)),
        st.tuples(st.just("rel"), st.integers(0, 31)),
    ),
    max_size=60,
)


def _new(subpool: ipaddress.IPv4Network | None) -> tuple[Ipam, MemoryStore, str]:
    store = MemoryStore()
    ipam = Ipam(store, RANGES, FakeClock())
    pool = ipam.request_pool(PoolRequest(LOCAL_SPACE, SUBNET, subpool, False))
    ipam.bind_network(hexid("net"), [SUBNET])
    return ipam, store, pool.id


def _held(ipam: Ipam, pid: str) -> set[Any]:
    return {a.address for a in ipam.pool(pid).endpoint_allocations()}


@settings(max_examples=150, deadline=None)
@given(subpool=st.sampled_from(SUBPOOLS), ops=OPS)
def test_random_request_release_never_hands_out_a_bad_address(
    subpool: ipaddress.IPv4Network | None, ops: list[tuple[str, int | None]]
) -> None:
    ipam, store, pid = _new(subpool)
    gateway = ipam.pool(pid).gateway
    allocatable = subpool or SUBNET
    usable = {a for a in allocatable if a not in (SUBNET.network_address, SUBNET.broadcast_address, gateway)}
    held: set[Any] = set()  # the model
    for n, (op, arg) in enumerate(ops):
        if op == "rel":
            if held:
                victim = sorted(held)[arg % len(held)]  # type: ignore[operator]
                held.discard(victim)
            else:  # releasing what is not allocated is a no-op (the gateway stays: only network rm frees it)
                victim = SUBNET.network_address + 2 + (arg % 13)
            ipam.release_address(pid, victim)
        else:
            wanted = None if arg is None else SUBNET.network_address + arg
            try:
                _, alloc = ipam.request_address(pid, wanted, mac=f"02:00:00:00:00:{n:02x}")
            except AddressExhausted:
                assert wanted is None and held == usable
            except Conflict:
                assert wanted in held or wanted == gateway
            except InvalidRequest:
                assert wanted not in usable and wanted != gateway
            else:
                assert alloc.kind == KIND_ENDPOINT
                assert alloc.address not in held, f"{alloc.address} handed out twice"
                assert alloc.address in usable, f"{alloc.address} is not allocatable"
                assert wanted in (None, alloc.address)
                held.add(alloc.address)
        assert _held(ipam, pid) == held
    assert ipam.pool(pid).gateway == gateway
    assert Ipam(store, RANGES).pools() == ipam.pools(), "persisted state does not reload identically"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["pool", "v6pool", "release", "addr"]), max_size=25))
def test_random_pool_sequences_reload_identically(ops: list[str]) -> None:
    store = MemoryStore()
    ipam = Ipam(store, RANGES, FakeClock())
    for op in ops:
        pools = ipam.pools()
        if op in ("pool", "v6pool"):
            ipam.request_pool(PoolRequest(LOCAL_SPACE, None, None, op == "v6pool"))
        elif op == "release" and pools:
            ipam.release_pool(pools[-1].id)
        elif op == "addr" and pools:
            ipam.request_address(pools[0].id, None)
    subnets = [p.subnet for p in ipam.pools()]
    assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1 :] if a.version == b.version)
    assert Ipam(store, RANGES).pools() == ipam.pools()


def test_concurrent_requests_get_distinct_addresses() -> None:
    store = MemoryStore()
    ipam = Ipam(store, RANGES, FakeClock())
    big = ipam.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.IPv4Network("10.8.0.0/24"), None, False))
    ipam.bind_network(hexid("net2"), [big.subnet])
    threads_n = 32
    barrier = threading.Barrier(threads_n)
    results: list[Any] = [None] * threads_n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = ipam.request_address(big.id, None, mac=f"02:00:00:00:01:{i:02x}")[1].address
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(results)) == threads_n
    assert _held(ipam, big.id) == set(results)
    assert Ipam(store, RANGES).pool(big.id) == ipam.pool(big.id)
