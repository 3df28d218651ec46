"""Agent restart under traffic: a new Datapath and executor take over the pinned state without a gap.

The instance here is private to this module so that `observe()` with no keys sees exactly
what these tests built. Policy survives a restart too: a denied path never opens and an
allowed path never closes while the new agent loads and re-syncs (reliability.md S6).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datapath import plan
from datapath.plan import Programs

from .conftest import Guest, Instance, Policy, guest_factory, policy_session
from .helpers import (
    VERDICT,
    EventLog,
    PingProbe,
    TcMonitor,
    TcpProbe,
    TcpServer,
    attached_prog_ids,
    counter_delta,
    prog_id,
    send_frames,
    udp_frame,
)

pytestmark = pytest.mark.kernel

DROP_INVALID_SIP = VERDICT["DROP_INVALID_SIP"]
DROP_POLICY, DROP_POLICY_DENY = VERDICT["DROP_POLICY"], VERDICT["DROP_POLICY_DENY"]


@pytest.fixture(scope="module")
def rsi(instances: Callable[[str], Instance]) -> Instance:
    return instances("r").ensure_network()


@pytest.fixture
def pair(rsi: Instance) -> Iterator[tuple[Guest, Guest]]:
    with guest_factory(rsi) as make:
        yield make(), make()


@pytest.fixture
def policy(rsi: Instance) -> Iterator[Policy]:
    with policy_session(rsi) as session:
        yield session


@contextlib.contextmanager
def restarted_agent(inst: Instance, revision: str = "") -> Iterator[tuple[Any, Any]]:
    """A second Datapath + KernelExecutor for the same instance and pin dir, as after a restart
    (with `revision`: as an upgraded agent, claiming freshly compiled programs over the same maps;
    without, it reuses the pinned programs of the running revision)."""
    from datapath.kernel.executor import KernelExecutor
    from datapath.kernel.loader import Datapath

    dp = Datapath(inst.pin_dir, reuse=not revision)
    if revision:
        dp.revision = revision
    kernel = KernelExecutor(inst.name, dp)
    try:
        yield dp, kernel
    finally:
        kernel.close()
        dp.close()


@contextlib.contextmanager
def tc_monitor() -> Iterator[TcMonitor]:
    monitor = TcMonitor()
    try:
        yield monitor
    finally:
        monitor.close()


@contextlib.contextmanager
def probing(src: Guest, dst: Guest) -> Iterator[PingProbe]:
    probe = PingProbe(src.ns, dst.ip4)
    try:
        probe.wait_replies(5)
        yield probe
    finally:
        probe.close()


def finish(probe: PingProbe) -> None:
    """Let the probe run past the change, then require an unbroken run of replies."""
    covered = len(probe.replies())
    probe.wait_replies(covered + 10)
    lost = probe.stop()
    assert lost == [], f"probes lost during the restart: icmp_seq {lost}\n{probe.output()[-2000:]}"
    assert probe.replies()[-1] > covered


def test_restart_keeps_traffic_and_plans_nothing(rsi: Instance, pair: tuple[Guest, Guest]) -> None:
    a, b = pair
    networks, endpoints = [rsi.network], [a.ep, b.ep]
    old_ids = {g.ep.host_ifname: attached_prog_ids(g.ep.host_ifname, "ingress") for g in pair}

    with probing(a, b) as probe, tc_monitor() as tc, restarted_agent(rsi) as (dp, kernel):
        assert dp.revision == rsi.dp.revision  # same sources, same flags: same revision
        desired = plan.desired_state(networks, endpoints, plan.Settings(rsi.name, False, dp.revision))
        change = plan.diff(desired, kernel.observe())
        kernel.apply(change)
        tc_changes = tc.drain([a.ifindex, b.ifindex])
        finish(probe)
        observed = kernel.observe()

    touched = [*change.remove, *change.add, *(new for _, new in change.change)]
    assert not any(isinstance(o, Programs) for o in touched), change.describe()
    assert not change, f"restart on an identical state should change nothing: {change.describe()}"
    assert tc_changes == []
    assert observed == desired
    assert not plan.diff(desired, observed)
    # The programs the first agent attached are still the ones running.
    assert {g.ep.host_ifname: attached_prog_ids(g.ep.host_ifname, "ingress") for g in pair} == old_ids


def test_events_and_counters_of_running_programs_reach_the_new_agent(rsi: Instance, pair: tuple[Guest, Guest]) -> None:
    a, b = pair
    with restarted_agent(rsi) as (dp, _kernel):
        log = EventLog(dp)
        since, before = log.mark(), dp.counters()
        port = 40000 + secrets.randbelow(20000)
        frame = udp_frame(a.ep.mac, a.ep.host_mac, "192.0.2.99", b.ip4, port, b"cg-forged")
        send_frames(a.ns, frame)  # dropped by programs the *first* Datapath loaded

        ev = log.wait_for(
            lambda e: e["code"] == DROP_INVALID_SIP and e.get("dport") == port,
            since=since,
            what="the drop event in the pinned ring buffer",
        )
        assert ev["ifindex"] == a.ifindex and ev["src"] == "192.0.2.99"
        assert counter_delta(before, dp.counters(), DROP_INVALID_SIP) == (1, len(frame))


def test_new_program_revision_is_swapped_in_without_a_gap(rsi: Instance, pair: tuple[Guest, Guest]) -> None:
    a, b = pair
    networks, endpoints = [rsi.network], [a.ep, b.ep]

    with probing(a, b) as probe, tc_monitor() as tc, restarted_agent(rsi, "upgrade") as (dp, kernel):
        # Same code, freshly loaded programs under a new name: what an upgraded agent brings.
        old_revision = rsi.dp.revision
        dp.revision = hashlib.sha256(b"cellgate-upgrade:" + old_revision.encode()).hexdigest()[:16]
        desired = plan.desired_state(networks, endpoints, plan.Settings(rsi.name, False, dp.revision))
        change = plan.diff(desired, kernel.observe())

        assert not change.add and not change.remove, change.describe()
        assert sorted(change.change, key=str) == sorted(
            ((Programs(g.ep.host_ifname, old_revision), Programs(g.ep.host_ifname, dp.revision)) for g in pair),
            key=str,
        )
        kernel.apply(change)
        tc_changes = tc.drain([a.ifindex, b.ifindex])
        finish(probe)

        # Replaced in place: four filter updates, never a filter or the clsact qdisc deleted.
        assert tc_changes == ["RTM_NEWTFILTER"] * 4
        assert kernel.observe() == desired  # exactly one filter per direction, of the new revision
        assert not plan.diff(desired, kernel.observe())
        for g in pair:
            assert attached_prog_ids(g.ep.host_ifname, "ingress") == [prog_id(dp.programs["cg_from_container"].fd)]
            assert attached_prog_ids(g.ep.host_ifname, "egress") == [prog_id(dp.programs["cg_to_container"].fd)]


def test_restart_keeps_a_denied_path_denied_and_an_allowed_path_open(rsi: Instance, policy: Policy) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    from_a = [{"matchLabels": {"app": "a"}}]
    policy.add_rules(
        [
            {
                "description": "b-deny-80",
                "endpointSelector": {"matchLabels": {"app": "b"}},
                "ingressDeny": [{"fromEndpoints": from_a, "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
            },
            {
                "description": "b-allow-81",
                "endpointSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"fromEndpoints": from_a, "toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}],
            },
        ]
    )
    policy.sync()
    compiled = policy.compile()
    deny_rule = policy.rule_id("b-deny-80")

    with guest_factory(rsi) as make:
        a, b = make(identity=a_id), make(identity=b_id)
        since = rsi.events.mark()
        # 0.8 s for the allowed probe: a dropped SYN is only retransmitted after 1 s, so it fails.
        # An attempt every 2 ms: a restart that reuses the pinned programs takes a few ms only.
        with (
            TcpServer(b.ns, [b.ip4], [80, 81]),
            TcpProbe(a.ns, b.ip4, 80, interval=0.002, timeout=0.2) as denied,
            TcpProbe(a.ns, b.ip4, 81, interval=0.002, timeout=0.8) as allowed,
        ):
            for probe in (denied, allowed):
                probe.wait(lambda r: len(r) >= 5, what="probes before the restart")
            started = time.monotonic()
            with restarted_agent(rsi) as (dp, kernel):
                # What a starting agent does: read what the pinned map holds, write the compile output.
                held = kernel.policy_entries()
                upserts = {k: v for k, v in compiled.items() if held.get(k) != v}
                deletes = [k for k in held if k not in compiled]
                kernel.policy_update(upserts, deletes)
                desired = plan.desired_state([rsi.network], [a.ep, b.ep], plan.Settings(rsi.name, False, dp.revision))
                change = plan.diff(desired, kernel.observe())
                kernel.apply(change)
                finished = time.monotonic()
                for probe in (denied, allowed):
                    probe.wait(lambda r: sum(start > finished for start, _, _ in r) >= 5, what="probes after it")
                after = kernel.policy_entries()
            results = {80: denied.stop(), 81: allowed.stop()}

    assert held == compiled and not upserts and not deletes  # the pinned map came through intact
    assert after == compiled
    assert not change, change.describe()
    through = [r for r in results[80] if r[2]]
    refused = [r for r in results[81] if not r[2]]
    assert through == [], f"the denied port let connections through: {through}"
    assert refused == [], f"the allowed port refused connections: {refused}"
    for port, attempts in results.items():  # both probes covered the restart window
        assert any(start < started for start, _, _ in attempts), port
        assert any(end > started and start < finished for start, end, _ in attempts), port
        assert any(start > finished for start, _, _ in attempts), port
    seen = rsi.events.since(since)
    deny_drops = [e for e in seen if e["type"] == "drop" and e.get("dport") == 80]
    assert deny_drops and {(e["code"], e["rule"], e["src_identity"]) for e in deny_drops} == {
        (DROP_POLICY_DENY, deny_rule, a_id)
    }
    assert not [e for e in seen if e["code"] in (DROP_POLICY, DROP_POLICY_DENY) and e.get("dport") == 81]


def test_a_restart_reuses_the_running_programs_without_compiling(rsi: Instance, pair: tuple[Guest, Guest]) -> None:
    a, _ = pair
    with restarted_agent(rsi) as (dp, _kernel):
        assert dp.reused and dp.compile_seconds == 0.0 and dp.bpf is None, "a restart of the same revision compiled"
        assert dp.revision == rsi.dp.revision
        # the very programs that the first start loaded and attached, opened from their pins
        assert attached_prog_ids(a.ep.host_ifname, "ingress") == [prog_id(dp.programs["cg_from_container"].fd)]
        assert attached_prog_ids(a.ep.host_ifname, "egress") == [prog_id(dp.programs["cg_to_container"].fd)]


def test_a_map_replaced_behind_the_agent_makes_a_new_revision_that_compiles() -> None:
    """Programs stay bound to the maps they were loaded with: after a pin is removed, reusing them
    (or leaving them attached) would write where the agent no longer reads."""
    from datapath.kernel import bpfsys
    from datapath.kernel.loader import Datapath, pinned_map_ids, remove_pins

    pin_dir = Path("/sys/fs/bpf") / f"cgk{secrets.token_hex(4)}"
    try:
        first = Datapath(pin_dir)
        assert not first.reused
        revision = first.revision
        first.close()
        (pin_dir / "cg_ct").unlink()
        second = Datapath(pin_dir)
        try:
            assert not second.reused and second.revision != revision
            ids = pinned_map_ids(pin_dir)
            assert ids is not None
            assert ids["cg_ct"] in bpfsys.prog_map_ids(second.programs["cg_from_container"].fd)
            assert [p.name for p in (pin_dir / "cache").iterdir()] == [second.revision]  # the old one is gone
        finally:
            second.close()
        third = Datapath(pin_dir)
        assert third.reused and third.revision == second.revision
        third.close()
    finally:
        remove_pins(pin_dir)
    assert not pin_dir.exists()
