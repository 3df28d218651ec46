"""Netlink handles called from the agent's request threads keep no state per call or per thread.

pyroute2's IPRoute keeps per-thread state for any thread that uses it and queues messages
nobody reads (datapath.kernel.netlink); the agent's kernel context and the CNI namespace
operations run on request threads, so each call must leave nothing behind: no descriptor per
thread, and no memory that grows with the number of calls.
"""

from __future__ import annotations

import gc
import os
import secrets
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from ipaddress import ip_interface

import pytest

from datapath.kernel.context import KernelContext
from datapath.kernel.netlink import RENEW_AFTER, ConfinedIPRoute
from datapath.kernel.netns import NetnsOps

from .helpers import in_ns, run

pytestmark = pytest.mark.kernel

CALLS = 4 * RENEW_AFTER  # netlink calls per measured round
BYTES_PER_CALL = 16  # kept per call at most (about 250 before the fix: queued messages, event loop ids)
THREADS = 8


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def in_thread(fn: Callable[[], object]) -> None:
    """Run `fn` on a new thread, as a request of the agent would, and re-raise what it raised."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            failed.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]


def traced_growth(fn: Callable[[], object], calls: int) -> int:
    """Bytes more allocated after `calls` calls of `fn` on another thread than after the `calls` before,
    less CPython's bounded type attribute cache (the names pyroute2 formats for getattr() live there
    until their slot is reused). Both rounds end in the same phase of the socket's renewal when
    `calls` makes a multiple of RENEW_AFTER netlink calls, so a bounded state cancels out."""

    def settled() -> int:
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, "*/pyroute2/requests/main.py"),
                tracemalloc.Filter(False, tracemalloc.__file__),
            ]
        )
        return sum(stat.size for stat in snap.statistics("filename"))

    tracemalloc.start(1)
    try:
        in_thread(lambda: [fn() for _ in range(calls)])  # what lives on is allocated while traced
        before = settled()
        in_thread(lambda: [fn() for _ in range(calls)])
        return settled() - before
    finally:
        tracemalloc.stop()


@pytest.fixture
def ctx() -> Iterator[KernelContext]:
    context = KernelContext(f"cgl{secrets.token_hex(3)}", None)  # made here, called from other threads
    yield context
    context.close()


def test_kernel_context_calls_from_other_threads_do_not_grow(ctx: KernelContext) -> None:
    def lookups() -> None:
        assert ctx.link("lo") is not None
        assert ctx.link(f"cgl{secrets.token_hex(4)}") is None  # the NetlinkError path

    grown = traced_growth(lookups, CALLS // 2)  # two netlink calls each
    assert grown < CALLS * BYTES_PER_CALL, f"{grown / CALLS:.0f} bytes kept per netlink call"


def test_kernel_context_keeps_one_socket_whatever_threads_call_it(ctx: KernelContext) -> None:
    ctx.owned_links()
    before = fds()
    for _ in range(THREADS):
        in_thread(lambda: (ctx.link("lo"), ctx.owned_links()))
    assert fds() == before, "a netlink socket was left open per calling thread"


def test_confined_iproute_renews_its_socket_and_answers_throughout() -> None:
    with ConfinedIPRoute(renew_after=3) as ipr:
        for _ in range(10):
            assert ipr.link_lookup(ifname="lo") == [1]
        assert ipr.renewed >= 3
        assert isinstance(ipr.get_links(), tuple)  # a dump is read in the socket's thread
    with pytest.raises(OSError):
        ipr.link_lookup(ifname="lo")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"cglns{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def test_namespace_operations_from_request_threads_leave_nothing_behind(netns: str) -> None:
    path = f"/run/netns/{netns}"
    ops = NetnsOps()
    made: list[str] = []

    def attach_and_detach() -> None:
        peer = f"cgl{secrets.token_hex(5)}"
        made.append(peer)
        run("ip", "link", "add", peer, "type", "veth", "peer", "name", f"{peer}p")  # one end waits in the host
        assert ops.attach(path, peer, "eth1", [ip_interface("10.234.0.2/24")], []) == []
        state = ops.interface(path, "eth1")
        assert state is not None and ip_interface("10.234.0.2/24") in state.addresses
        ops.detach(path, "eth1")
        assert ops.interface(path, "eth1") is None

    try:
        in_thread(attach_and_detach)
        before = fds()
        for _ in range(THREADS):
            in_thread(attach_and_detach)  # each call on another thread, as the API's pool does
        assert fds() == before, "a netlink socket was left open per calling thread"
        assert "eth1" not in in_ns(netns, "ip", "-o", "link").stdout
        grown = traced_growth(lambda: ops.interface(path, "lo"), CALLS // 4)
        assert grown < CALLS // 4 * BYTES_PER_CALL, f"{grown / (CALLS // 4):.0f} bytes kept per namespace operation"
    finally:
        for peer in made:
            run("ip", "link", "del", f"{peer}p", check=False)  # takes the end in the namespace with it
