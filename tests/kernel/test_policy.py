"""Identity-based L3/L4 policy and conntrack in the real datapath.

Real programs on real veths, endpoints in their own namespaces, real TCP, UDP and ICMP
(and crafted frames where a test needs one exact packet). Every verdict the kernel gives
is also predicted with datapath.policy.compile.decide over the entries the kernel holds, so
`policy trace` cannot disagree with the datapath (the trace guarantee).
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from datapath import identity as ids
from datapath import plan, reasons
from datapath.kernel import layout
from datapath.plan import AddressEntry, EndpointEntry, IpcacheEntry
from datapath.policy.compile import Entries, PolicyKey, PolicyValue, decide

from .conftest import Guest, Instance, Policy, guest_factory, policy_session
from .helpers import (
    VERDICT,
    Capture,
    TcpProbe,
    TcpServer,
    TcpStream,
    counter_delta,
    icmp4_error_frame,
    in_ns,
    ipv6_frame,
    ping,
    ping_fails,
    send_frames,
    tcp_try,
    udp_ask,
    udp_frame,
    wait_until,
)

pytestmark = pytest.mark.kernel

CG_OK_LOCAL, CG_OK_POLICY = VERDICT["CG_OK_LOCAL"], VERDICT["CG_OK_POLICY"]
DROP_POLICY, DROP_POLICY_DENY = VERDICT["DROP_POLICY"], VERDICT["DROP_POLICY_DENY"]
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
CG_CT_F_REPLIED = 0x1
CG_CT_SIDE_BOTH = 0x3  # CG_CT_SIDE_EGRESS | CG_CT_SIDE_INGRESS (bpf/lib/maps.h)
DENIED_WAIT = 0.5  # a connection the policy drops never completes; this only bounds the attempt
ALLOWED_WAIT = 3.0

Endpoints = Callable[..., Guest]


@pytest.fixture(scope="module")
def pi(instances: Callable[[str], Instance]) -> Instance:
    """An instance of its own: these tests change its policy map, tracing and timeouts."""
    return instances("p").ensure_network()


@pytest.fixture
def policy(pi: Instance) -> Iterator[Policy]:
    with policy_session(pi) as session:
        yield session


@pytest.fixture
def endpoints(pi: Instance, policy: Policy) -> Iterator[Endpoints]:
    """Endpoints of `pi` in their own netns (made after `policy`, so removed before it is reset)."""
    with guest_factory(pi) as make:
        yield make


# -- what the kernel should decide -------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    code: int  # CG_OK_POLICY, DROP_POLICY or DROP_POLICY_DENY
    rule: int  # the rule events name (0 = default)
    side: str  # "egress" (the sender's) or "ingress" (the receiver's): the side that decided


def _code(entries: Entries, subject: int, egress: bool, peer: int, proto: int, port: int) -> tuple[int, int]:
    d = decide(entries, subject, egress, peer, proto, port)
    if d.allowed:
        return CG_OK_POLICY, d.rule
    return (DROP_POLICY_DENY if d.value is not None and d.value.deny else DROP_POLICY), d.rule


def predict(
    entries: Entries, src: int, dst: int, proto: int, port: int, src_local: bool = True, dst_local: bool = True
) -> Expected:
    """The datapath's verdict on a new flow, from compile.decide: the sender's egress when it
    is a local endpoint, then the receiver's ingress when that is; the more specific rule is named."""
    code, rule, side = CG_OK_POLICY, 0, "ingress"
    if src_local:
        code, rule = _code(entries, src, True, dst, proto, port)
        side = "egress"
    if code == CG_OK_POLICY and dst_local:
        code, ingress_rule = _code(entries, dst, False, src, proto, port)
        if code != CG_OK_POLICY or not src_local or not rule:
            rule, side = ingress_rule, "ingress"
    return Expected(code, rule, side)


def decided(ev: dict[str, Any]) -> Expected:
    return Expected(ev["code"], ev["rule"], ev["side"])


def event(inst: Instance, since: int, **fields: Any) -> dict[str, Any]:
    """The first event since `since` whose fields have these values."""
    return inst.events.wait_for(
        lambda e: all(e.get(k) == v for k, v in fields.items()), since=since, what=f"an event with {fields}"
    )


def ct_entry(inst: Instance, src: Any, dst: Any, sport: int, dport: int, proto: int) -> layout.CgCtValue | None:
    """The conntrack entry of exactly this tuple (as its first packet had it), if any."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for key, value in inst.kernel.ct_entries():
        if (
            (key.family, key.proto) == (src.version, proto)
            and bytes(key.saddr)[: len(src.packed)] == src.packed
            and bytes(key.daddr)[: len(dst.packed)] == dst.packed
            and (socket.ntohs(key.sport), socket.ntohs(key.dport)) == (sport, dport)
        ):
            return value
    return None


def port_rule(
    description: str, subject: str, peer: str | None, ports: list[int], proto: str = "TCP", direction: str = "ingress"
) -> dict[str, Any]:
    """A rule selecting app=<subject> that allows (or, for *Deny directions, denies) `ports`
    from/to app=<peer> (None: from/to anyone)."""
    word = "to" if direction.startswith("egress") else "from"
    peer_rule: dict[str, Any] = {"toPorts": [{"ports": [{"port": str(p), "protocol": proto} for p in ports]}]}
    if peer is not None:
        peer_rule[f"{word}Endpoints"] = [{"matchLabels": {"app": peer}}]
    return {"description": description, "endpointSelector": {"matchLabels": {"app": subject}}, direction: [peer_rule]}


def free_port() -> int:
    return random.randrange(20000, 60000)


def token(kind: str) -> str:
    return f"cg-{kind}-{secrets.token_hex(6)}"


def policy_drops(inst: Instance, since: int) -> list[dict[str, Any]]:
    return [e for e in inst.events.since(since) if e["type"] == "drop" and e["code"] == DROP_POLICY]


# -- identities and ports ------------------------------------------------------------------------


def test_ingress_rule_admits_one_identity_on_one_port(pi: Instance, policy: Policy, endpoints: Endpoints) -> None:
    a_id, b_id, c_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    policy.add_rules([port_rule("b-from-a-80", "b", "a", [80])])
    policy.sync()
    entries, rule = policy.entries, policy.rule_id("b-from-a-80")
    assert entries == policy.compile()
    assert {k: v for k, v in entries.items() if k.subject == b_id and not k.egress} == {
        PolicyKey(b_id, False, a_id, TCP, 80, 16): PolicyValue(False, rule)
    }
    a, b, c = endpoints(identity=a_id), endpoints(identity=b_id), endpoints(identity=c_id)
    since, before = pi.events.mark(), pi.dp.counters()

    with TcpServer(b.ns, [b.ip4, b.ip6], [80, 81]):
        nc = in_ns(a.ns, "nc", "-N", "-w", "3", str(b.ip4), "80", stdin="hello from a\n")
        over_v6 = tcp_try(a.ns, b.ip6, 80, ALLOWED_WAIT)
        wrong_port = tcp_try(a.ns, b.ip4, 81, DENIED_WAIT)
        wrong_peer = tcp_try(c.ns, b.ip4, 80, DENIED_WAIT)
        wrong_peer6 = tcp_try(c.ns, b.ip6, 80, DENIED_WAIT)

    assert nc.stdout == "cg 80\necho hello from a\n"
    assert over_v6 == "ok"
    assert (wrong_port, wrong_peer, wrong_peer6) == ("timeout", "timeout", "timeout")

    allowed = event(pi, since, type="verdict", src_identity=a_id, dst=str(b.ip4), dport=80)
    assert allowed["verdict"] == "allowed" and allowed["ct_state"] == "new"
    assert decided(allowed) == predict(entries, a_id, b_id, TCP, 80) == Expected(CG_OK_POLICY, rule, "ingress")
    for src, src_id, dst, port in ((a, a_id, b.ip4, 81), (c, c_id, b.ip4, 80), (c, c_id, b.ip6, 80)):
        expected = predict(entries, src_id, b_id, TCP, port)
        assert expected == Expected(DROP_POLICY, 0, "ingress")
        drop = event(pi, since, type="drop", src_identity=src_id, dst_identity=b_id, dst=str(dst), dport=port)
        verdict = event(pi, since, type="verdict", src_identity=src_id, dst_identity=b_id, dst=str(dst), dport=port)
        assert drop["reason"] == "policy denied" and verdict["verdict"] == "denied"
        assert decided(drop) == decided(verdict) == expected
        assert drop["ifindex"] == src.ifindex and drop["direction"] == "from-endpoint"
        assert drop["ct_state"] == "new"
    # Every policy drop is counted, packet for packet.
    wait_until(
        lambda: counter_delta(before, pi.dp.counters(), DROP_POLICY)[0] == len(policy_drops(pi, since)) >= 3,
        what="the policy drop counter to match the drop events",
    )


def test_wildcard_port_rule_is_one_entry_for_any_peer(pi: Instance, policy: Policy, endpoints: Endpoints) -> None:
    a_id, b_id, c_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    policy.add_rules([port_rule("b-80-from-anyone", "b", None, [80])])
    policy.sync()
    entries, rule = policy.entries, policy.rule_id("b-80-from-anyone")
    assert {k: v for k, v in entries.items() if k.subject == b_id and not k.egress} == {
        PolicyKey(b_id, False, ids.ANY, TCP, 80, 16): PolicyValue(False, rule)
    }
    a, b, c = endpoints(identity=a_id), endpoints(identity=b_id), endpoints(identity=c_id)
    since = pi.events.mark()

    with TcpServer(b.ns, [b.ip4], [80, 81]):
        from_a = in_ns(a.ns, "nc", "-N", "-w", "3", str(b.ip4), "80", stdin="a\n").stdout
        from_c = in_ns(c.ns, "nc", "-N", "-w", "3", str(b.ip4), "80", stdin="c\n").stdout
        other_port = tcp_try(a.ns, b.ip4, 81, DENIED_WAIT)

    assert (from_a, from_c, other_port) == ("cg 80\necho a\n", "cg 80\necho c\n", "timeout")
    for src_id in (a_id, c_id):
        ev = event(pi, since, type="verdict", src_identity=src_id, dst_identity=b_id, dport=80)
        assert decided(ev) == predict(entries, src_id, b_id, TCP, 80) == Expected(CG_OK_POLICY, rule, "ingress")
    drop = event(pi, since, type="drop", src_identity=a_id, dst_identity=b_id, dport=81)
    assert decided(drop) == predict(entries, a_id, b_id, TCP, 81) == Expected(DROP_POLICY, 0, "ingress")


# -- replies and related ---------------------------------------------------------------------------


def test_replies_and_related_icmp_pass_an_egress_default_deny(
    pi: Instance, policy: Policy, endpoints: Endpoints
) -> None:
    a_id, b_id, c_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    closed = free_port()
    policy.add_rules(
        [
            port_rule("b-from-a-80", "b", "a", [80]),
            port_rule("b-from-a-udp", "b", "a", [closed], proto="UDP"),
            port_rule("b-only-dns-to-c", "b", "c", [53], proto="UDP", direction="egress"),
        ]
    )
    policy.sync()
    entries = policy.entries
    assert {k for k in entries if k.subject == b_id and k.egress} == {PolicyKey(b_id, True, c_id, UDP, 53, 16)}
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)
    pi.kernel.set_config(True, {})  # trace forwarded packets too
    since = pi.events.mark()

    with TcpServer(b.ns, [b.ip4], [80]), TcpServer(a.ns, [a.ip4], [80]):
        a_to_b = tcp_try(a.ns, b.ip4, 80, ALLOWED_WAIT)  # b answers: its packets are replies
        b_to_a = tcp_try(b.ns, a.ip4, 80, DENIED_WAIT)  # but b may not open a flow to a

    assert (a_to_b, b_to_a) == ("ok", "timeout")
    reply = event(pi, since, type="trace", ifindex=b.ifindex, ct_state="reply", protocol="tcp", sport=80)
    assert reply["code"] == CG_OK_LOCAL and reply["dst"] == str(a.ip4)
    refused = event(pi, since, type="drop", src_identity=b_id, dst_identity=a_id, dport=80)
    assert decided(refused) == predict(entries, b_id, a_id, TCP, 80) == Expected(DROP_POLICY, 0, "egress")

    # UDP to a closed port: b's port unreachable quotes the tracked flow, so it is related.
    assert predict(entries, b_id, a_id, ICMP, 3) == Expected(DROP_POLICY, 0, "egress")  # as a new flow: denied
    assert udp_ask(a.ns, b.ip4, closed) == "refused"
    related = event(pi, since, type="trace", ifindex=b.ifindex, ct_state="related", protocol="icmp", icmp_type=3)
    assert (related["icmp_code"], related["src"], related["dst"]) == (3, str(b.ip4), str(a.ip4))

    # The same error quoting a flow nobody tracks is a new flow from b, and b's egress drops it.
    untracked = free_port()
    quoted = udp_frame(a.ep.mac, a.ep.host_mac, a.ip4, b.ip4, untracked, b"never sent", sport=untracked)[14:42]
    send_frames(b.ns, icmp4_error_frame(b.ep.mac, b.ep.host_mac, b.ip4, a.ip4, 3, 3, quoted))
    forged = event(pi, since, type="drop", ifindex=b.ifindex, protocol="icmp", icmp_type=3)
    assert forged["ct_state"] == "new" and forged["dst"] == str(a.ip4)
    assert decided(forged) == predict(entries, b_id, a_id, ICMP, 3)


@pytest.mark.parametrize("version", [4, 6])
def test_an_icmp_error_from_a_third_party_is_not_related(
    pi: Instance, policy: Policy, endpoints: Endpoints, version: int
) -> None:
    """Quoting a tracked flow makes an error related only on its way back from the flow's peer."""
    a_id, b_id, c_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    port, sport = free_port(), free_port()
    policy.add_rules(
        [
            port_rule("b-from-a-udp", "b", "a", [port], proto="UDP"),
            {
                "description": "a-from-b-only",
                "endpointSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}],
            },
        ]
    )
    policy.sync()
    entries = policy.entries
    a, b, c = endpoints(identity=a_id), endpoints(identity=b_id), endpoints(identity=c_id)
    a_ip, b_ip = (a.ip4, b.ip4) if version == 4 else (a.ip6, b.ip6)
    send_frames(a.ns, udp_frame(a.ep.mac, a.ep.host_mac, a_ip, b_ip, port, b"tracked", sport=sport))
    wait_until(lambda: ct_entry(pi, a_ip, b_ip, sport, port, UDP), what="the tracked a->b flow")
    forged, stop = token("forged"), token("stop")
    quoted = udp_frame(a.ep.mac, a.ep.host_mac, a_ip, b_ip, port, forged.encode(), sport=sport)[14:]
    if version == 4:  # port unreachable, as b's stack would send it, but from c
        error = icmp4_error_frame(c.ep.mac, c.ep.host_mac, c.ip4, a.ip4, 3, 3, quoted)
        proto, icmp_type = ICMP, 3
    else:
        error = ipv6_frame(c.ep.mac, c.ep.host_mac, c.ip6, a.ip6, ICMPV6, bytes([1, 4]) + bytes(6) + quoted, csum_at=2)
        proto, icmp_type = ICMPV6, 1
    stop_frame = udp_frame(b.ep.mac, b.ep.host_mac, b_ip, a_ip, sport + 1, stop.encode(), sport=port)
    since = pi.events.mark()

    with Capture(a.ns, stop, [forged]) as capture:
        send_frames(c.ns, error)
        send_frames(b.ns, stop_frame)
        seen, stopped = capture.result()

    assert stopped and forged not in seen, "c's forged error reached a as if it were related to a's flow"
    drop = event(pi, since, type="drop", ifindex=c.ifindex, icmp_type=icmp_type)
    assert (drop["src_identity"], drop["dst_identity"], drop["ct_state"]) == (c_id, a_id, "new")
    assert decided(drop) == predict(entries, c_id, a_id, proto, icmp_type) == Expected(DROP_POLICY, 0, "ingress")


# -- deny precedence -------------------------------------------------------------------------------


@pytest.mark.parametrize("deny_peer", ["a", None], ids=["deny-from-a", "deny-from-anyone"])
def test_deny_beats_allow(pi: Instance, policy: Policy, endpoints: Endpoints, deny_peer: str | None) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    policy.add_rules(
        [
            port_rule("b-from-a", "b", "a", [80, 81]),
            port_rule("b-deny-80", "b", deny_peer, [80], direction="ingressDeny"),
        ]
    )
    policy.sync()
    entries, allow, deny = policy.entries, policy.rule_id("b-from-a"), policy.rule_id("b-deny-80")
    if deny_peer:  # the deny replaced the allow on the same key
        assert entries[PolicyKey(b_id, False, a_id, TCP, 80, 16)] == PolicyValue(True, deny)
    else:  # the datapath must combine the specific allow with the wildcard deny
        assert entries[PolicyKey(b_id, False, a_id, TCP, 80, 16)] == PolicyValue(False, allow)
        assert entries[PolicyKey(b_id, False, ids.ANY, TCP, 80, 16)] == PolicyValue(True, deny)
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)
    since = pi.events.mark()

    with TcpServer(b.ns, [b.ip4], [80, 81]):
        other = tcp_try(a.ns, b.ip4, 81, ALLOWED_WAIT)
        denied = tcp_try(a.ns, b.ip4, 80, DENIED_WAIT)

    assert (other, denied) == ("ok", "timeout")
    drop = event(pi, since, type="drop", src_identity=a_id, dport=80)
    verdict = event(pi, since, type="verdict", src_identity=a_id, dport=80)
    expected = predict(entries, a_id, b_id, TCP, 80)
    assert decided(drop) == decided(verdict) == expected == Expected(DROP_POLICY_DENY, deny, "ingress")
    assert drop["reason"] == reasons.name(DROP_POLICY_DENY) and verdict["verdict"] == "denied"
    ok = event(pi, since, type="verdict", src_identity=a_id, dport=81)
    assert decided(ok) == predict(entries, a_id, b_id, TCP, 81) == Expected(CG_OK_POLICY, allow, "ingress")


# -- revoke ----------------------------------------------------------------------------------------


def test_revoking_the_allow_cuts_a_live_tcp_stream(pi: Instance, policy: Policy, endpoints: Endpoints) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    port = free_port()
    policy.add_rules([port_rule("b-stream", "b", "a", [port])])
    policy.sync()
    rule = policy.rule_id("b-stream")
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)

    with TcpServer(b.ns, [b.ip4], [port]), TcpStream(a.ns, b.ip4, port) as stream:
        wait_until(lambda: stream.exchanges() >= 5, what="5 exchanges on the stream")
        sport = stream.sport()
        live = ct_entry(pi, a.ip4, b.ip4, sport, port, TCP)
        assert live is not None, "the live stream has no conntrack entry"
        assert (live.src_identity, live.dst_identity, live.rule) == (a_id, b_id, rule)
        assert predict(policy.entries, a_id, b_id, TCP, port) == Expected(CG_OK_POLICY, rule, "ingress")
        assert live.packets >= 10 and live.flags & CG_CT_F_REPLIED
        # The stream runs on the verdict cached in its entry, at the map's current revision...
        revision = pi.kernel.policy_revision()
        assert revision > 0 and (live.policy_rev, live.policy_sides) == (revision, CG_CT_SIDE_BOTH)
        key = decide(policy.entries, b_id, False, a_id, TCP, port).key
        assert key == PolicyKey(b_id, False, a_id, TCP, port, 16)
        since = pi.events.mark()

        pi.kernel.policy_update({}, [key])
        done = stream.exchanges()
        failure = wait_until(stream.failed, what="the stream's next exchange to fail")

        assert stream.exchanges() <= done + 1, f"exchanges kept working after the revoke ({failure})"
        assert pi.kernel.policy_revision() > revision  # ...which the removal moved on
    cut = event(pi, since, type="drop", src_identity=a_id, sport=sport, dport=port, ct_state="established")
    assert decided(cut) == predict(policy.entries, a_id, b_id, TCP, port) == Expected(DROP_POLICY, 0, "ingress")
    assert ct_entry(pi, a.ip4, b.ip4, sport, port, TCP) is None  # forgotten when the first packet was dropped


def test_a_party_changing_identity_is_decided_again_without_a_policy_change(
    pi: Instance, policy: Policy, endpoints: Endpoints
) -> None:
    """The cached verdict names the identities it was decided for: new labels on the sender
    (no policy-map write, so no new revision) stop its live stream on the next packet."""
    a_id, b_id, other_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    port = free_port()
    policy.add_rules([port_rule("b-from-a", "b", "a", [port])])
    policy.sync()
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)

    with TcpServer(b.ns, [b.ip4], [port]), TcpStream(a.ns, b.ip4, port) as stream:
        wait_until(lambda: stream.exchanges() >= 5, what="5 exchanges on the stream")
        sport = stream.sport()
        live = ct_entry(pi, a.ip4, b.ip4, sport, port, TCP)
        assert live is not None and live.policy_rev == pi.kernel.policy_revision() > 0
        revision = pi.kernel.policy_revision()
        since = pi.events.mark()

        a.set_identity(other_id)
        done = stream.exchanges()
        failure = wait_until(stream.failed, what="the stream's next exchange to fail")

        assert stream.exchanges() <= done + 1, f"exchanges kept working after the identity change ({failure})"
        assert pi.kernel.policy_revision() == revision, "no policy write was needed to stop it"
    cut = event(pi, since, type="drop", src_identity=other_id, sport=sport, dport=port, ct_state="established")
    assert decided(cut) == predict(policy.entries, other_id, b_id, TCP, port)
    assert decided(cut).code == DROP_POLICY


# -- a new endpoint is closed until its policy is in force (S7) ------------------------------------


def test_new_endpoint_is_closed_until_its_identity_policy_is_in_force(
    pi: Instance, policy: Policy, endpoints: Endpoints
) -> None:
    web_id = policy.identity("web")
    db_port, web_port = free_port(), free_port()
    policy.add_rules(
        [
            port_rule("db-from-web", "db", "web", [db_port]),
            port_rule("db-to-web", "db", "web", [web_port], direction="egress"),
        ]
    )
    policy.sync()
    closed = policy.entries
    assert not any(ids.INIT in (k.subject, k.peer) for k in closed)  # rules exist: init is denied both ways
    web = endpoints(identity=web_id)

    with TcpServer(web.ns, [web.ip4], [web_port]):
        db = endpoints()  # its labels are not known yet
        assert db.ep.identity == ids.INIT
        since = pi.events.mark()
        with (
            TcpServer(db.ns, [db.ip4], [db_port]),
            TcpProbe(web.ns, db.ip4, db_port, interval=0.02) as inbound,
            TcpProbe(db.ns, web.ip4, web_port, interval=0.02) as outbound,
        ):
            probes = {"web->db": inbound, "db->web": outbound}
            for name, probe in probes.items():
                probe.wait(lambda r: len(r) >= 5, what=f"5 {name} attempts")
            # Its labels are known: the identity's entries go in first, as the agent writes them ...
            db_id = policy.identity("db")
            upserts, deletes = policy.sync(delete=False)
            assert upserts and not deletes
            assert all(db_id in (k.subject, k.peer) for k in upserts)
            for name, probe in probes.items():
                n = len(probe.results())
                probe.wait(lambda r, n=n: len(r) >= n + 3, what=f"{name} attempts with the entries written")
            # ... then the endpoint switches to it.
            switch = time.monotonic()
            change = db.set_identity(db_id)
            assert not change.add and not change.remove
            assert {type(new) for _, new in change.change} == {EndpointEntry, AddressEntry}
            for name, probe in probes.items():
                probe.wait(lambda r: sum(ok for start, _, ok in r if start > switch) >= 3, what=f"{name} to open")
            results = {name: probe.stop() for name, probe in probes.items()}

    for name, attempts in results.items():
        before = [(start, end, ok) for start, end, ok in attempts if end < switch]
        assert not attempts[0][2], f"{name}: the very first attempt got through"
        assert len(before) >= 8 and not any(ok for *_, ok in before), f"{name} got through while closed: {before}"
    inbound_drop = event(pi, since, type="drop", dst_identity=ids.INIT, src_identity=web_id, dport=db_port)
    outbound_drop = event(pi, since, type="drop", src_identity=ids.INIT, dst_identity=web_id, dport=web_port)
    assert (
        decided(inbound_drop) == predict(closed, web_id, ids.INIT, TCP, db_port) == Expected(DROP_POLICY, 0, "ingress")
    )
    assert (
        decided(outbound_drop) == predict(closed, ids.INIT, web_id, TCP, web_port) == Expected(DROP_POLICY, 0, "egress")
    )
    opened = policy.entries
    rules = policy.rule_id("db-from-web"), policy.rule_id("db-to-web")
    assert predict(opened, web_id, db_id, TCP, db_port) == Expected(CG_OK_POLICY, rules[0], "ingress")
    assert predict(opened, db_id, web_id, TCP, web_port) == Expected(CG_OK_POLICY, rules[1], "egress")
    inbound_ok = event(pi, since, type="verdict", src_identity=web_id, dst_identity=db_id, dport=db_port)
    outbound_ok = event(pi, since, type="verdict", src_identity=db_id, dst_identity=web_id, dport=web_port)
    assert decided(inbound_ok) == predict(opened, web_id, db_id, TCP, db_port)
    assert decided(outbound_ok) == predict(opened, db_id, web_id, TCP, web_port)


# -- events and counters ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_verdict_events_for_new_flows_and_trace_events_only_while_tracing(
    pi: Instance, policy: Policy, endpoints: Endpoints, version: int
) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    open_port, shut_port = free_port(), free_port()
    policy.add_rules([port_rule("b-udp", "b", "a", [open_port], proto="UDP")])
    policy.sync()
    entries, rule = policy.entries, policy.rule_id("b-udp")
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)
    src, dst = (a.ip4, b.ip4) if version == 4 else (a.ip6, b.ip6)
    sports = random.sample(range(20000, 60000), 3)

    def send(*frames: tuple[int, int, str], seen_by_b: str) -> set[str]:
        """(dport, sport, marker) frames from a; returns the markers b received before `seen_by_b`."""
        raw = [udp_frame(a.ep.mac, a.ep.host_mac, src, dst, d, m.encode(), sport=s) for d, s, m in frames]
        with Capture(b.ns, seen_by_b, [m for *_, m in frames]) as capture:
            send_frames(a.ns, *raw)
            seen, arrived = capture.result()
        assert arrived, f"{seen_by_b} never reached b"
        return seen

    def mine(kind: str, since: int) -> list[dict[str, Any]]:
        return [
            e
            for e in pi.events.since(since)
            if e["type"] == kind and e["ifindex"] == a.ifindex and e.get("dport") in (open_port, shut_port)
        ]

    # Tracing off: one verdict per new flow, allowed or denied, and a counted drop.
    denied, allowed = token("denied"), token("allowed")
    since, before = pi.events.mark(), pi.dp.counters()
    seen = send((shut_port, sports[0], denied), (open_port, sports[0], allowed), seen_by_b=allowed)
    assert denied not in seen
    verdicts = sorted(mine("verdict", since), key=lambda e: e["dport"] == open_port)
    assert [(e["dport"], e["verdict"], e["ct_state"]) for e in verdicts] == [
        (shut_port, "denied", "new"),
        (open_port, "allowed", "new"),
    ]
    assert (
        [decided(e) for e in verdicts]
        == [predict(entries, a_id, b_id, UDP, shut_port), predict(entries, a_id, b_id, UDP, open_port)]
        == [Expected(DROP_POLICY, 0, "ingress"), Expected(CG_OK_POLICY, rule, "ingress")]
    )
    assert all((e["src_identity"], e["dst_identity"]) == (a_id, b_id) for e in verdicts)
    assert [e["dport"] for e in mine("drop", since)] == [shut_port]
    assert mine("trace", since) == []
    shut_frame = udp_frame(a.ep.mac, a.ep.host_mac, src, dst, shut_port, denied.encode(), sport=sports[0])
    assert counter_delta(before, pi.dp.counters(), DROP_POLICY) == (1, len(shut_frame))
    assert counter_delta(before, pi.dp.counters(), CG_OK_LOCAL)[0] >= 1

    # Tracing on: every forwarded packet is reported; verdicts still only for new flows.
    pi.kernel.set_config(True, {})
    again, fresh = token("again"), token("fresh")
    since = pi.events.mark()
    assert again in send((open_port, sports[0], again), (open_port, sports[1], fresh), seen_by_b=fresh)
    traces = mine("trace", since)
    assert [(e["sport"], e["ct_state"], e["code"], e["rule"]) for e in traces] == [
        (sports[0], "established", CG_OK_LOCAL, rule),
        (sports[1], "new", CG_OK_LOCAL, rule),
    ]
    assert [(e["sport"], e["verdict"]) for e in mine("verdict", since)] == [(sports[1], "allowed")]

    # Tracing off again: silence for forwarded packets.
    pi.kernel.set_config(False, {})
    last = token("last")
    since = pi.events.mark()
    send((open_port, sports[2], last), seen_by_b=last)
    assert mine("trace", since) == []
    assert [(e["sport"], e["verdict"]) for e in mine("verdict", since)] == [(sports[2], "allowed")]


# -- conntrack -------------------------------------------------------------------------------------


def test_conntrack_tracks_flows_and_gc_removes_expired_entries(
    pi: Instance, policy: Policy, endpoints: Endpoints
) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    port, sport = free_port(), free_port()
    policy.add_rules([port_rule("b-udp", "b", "a", [port], proto="UDP")])
    policy.sync()
    rule = policy.rule_id("b-udp")
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)
    timeout_ns = 2_000_000_000
    pi.kernel.set_config(False, {"other": timeout_ns / 1e9})
    out = [udp_frame(a.ep.mac, a.ep.host_mac, a.ip4, b.ip4, port, f"ct-{i}".encode(), sport=sport) for i in (1, 2)]
    back = udp_frame(b.ep.mac, b.ep.host_mac, b.ip4, a.ip4, sport, b"ct-back", sport=port)

    def entry(packets: int) -> layout.CgCtValue | None:
        found = ct_entry(pi, a.ip4, b.ip4, sport, port, UDP)
        return found if found is not None and found.packets == packets else None

    send_frames(a.ns, *out)
    first = wait_until(lambda: entry(2), what="a conntrack entry with both packets")
    assert (first.src_identity, first.dst_identity, first.rule) == (a_id, b_id, rule)
    assert predict(policy.entries, a_id, b_id, UDP, port) == Expected(CG_OK_POLICY, rule, "ingress")
    assert first.bytes == sum(len(f) for f in out) and not first.flags & CG_CT_F_REPLIED

    started = time.monotonic_ns()
    send_frames(b.ns, back)  # a reply: accounted to the same entry, which now lives 2 s from here
    replied = wait_until(lambda: entry(3), what="the reply accounted to the entry")
    seen = time.monotonic_ns()
    assert replied.flags & CG_CT_F_REPLIED and replied.bytes == sum(len(f) for f in (*out, back))
    tick = 10_000_000  # conntrack's clock is CLOCK_MONOTONIC at tick resolution (≤ 10 ms behind)
    assert started - tick + timeout_ns <= replied.expires <= seen + timeout_ns
    assert ct_entry(pi, b.ip4, a.ip4, port, sport, UDP) is None  # a reply creates no entry of its own

    now = time.monotonic_ns()
    assert now < replied.expires
    pi.kernel.ct_gc(now)
    assert entry(3) is not None, "gc removed an entry that had not expired"

    def collected() -> int | None:
        now = time.monotonic_ns()
        pi.kernel.ct_gc(now)
        return now if ct_entry(pi, a.ip4, b.ip4, sport, port, UDP) is None else None

    removed_at = wait_until(collected, timeout=timeout_ns / 1e9 + 3, what="gc to remove the expired entry")
    assert removed_at >= replied.expires


# -- the host --------------------------------------------------------------------------------------


def test_host_is_identified_through_the_ipcache(pi: Instance, policy: Policy, endpoints: Endpoints) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    policy.add_rules(
        [
            {
                "description": "b-host-only",
                "endpointSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"fromEntities": ["host"]}],
            }
        ]
    )
    policy.sync()
    entries, rule = policy.entries, policy.rule_id("b-host-only")
    a, b = endpoints(identity=a_id), endpoints(identity=b_id)
    gw4, gw6 = pi.gateway(4).ip, pi.gateway(6).ip  # the host's source address towards b
    assert {gw4, gw6} <= set(pi.kernel.host_addresses())

    # Not in the ipcache: the host's address is just the world, which b does not admit.
    since = pi.events.mark()
    assert ping_fails(None, b.ip4)
    world = event(pi, since, type="drop", direction="to-endpoint", src=str(gw4), dst=str(b.ip4), protocol="icmp")
    assert (world["src_identity"], world["dst_identity"], world["ifindex"]) == (ids.WORLD, b_id, b.ifindex)
    assert decided(world) == predict(entries, ids.WORLD, b_id, ICMP, 8, src_local=False)
    assert decided(world) == Expected(DROP_POLICY, 0, "ingress")

    # The plan puts the host's addresses into the ipcache as the host identity ...
    desired = plan.desired_state([pi.network], [a.ep, b.ep], pi.settings(), host_addresses=[gw4, gw6])
    host = {o for o in desired if isinstance(o, IpcacheEntry)}
    assert host == {
        IpcacheEntry(ipaddress.ip_network(gw4), ids.HOST),
        IpcacheEntry(ipaddress.ip_network(gw6), ids.HOST),
    }
    change = pi.converge(desired, plan.keys(host))
    assert set(change.add) == host and not change.remove and not change.change
    assert pi.kernel.observe(plan.keys(host)) == host

    # ... and now the host gets in, over both families ...
    since = pi.events.mark()
    ping(None, b.ip4)
    ping(None, b.ip6)
    for gw, dst, proto, echo in ((gw4, b.ip4, ICMP, 8), (gw6, b.ip6, ICMPV6, 128)):
        ev = event(pi, since, type="verdict", src=str(gw), dst=str(dst))
        assert (ev["src_identity"], ev["dst_identity"], ev["direction"]) == (ids.HOST, b_id, "to-endpoint")
        assert decided(ev) == predict(entries, ids.HOST, b_id, proto, echo, src_local=False)
        assert decided(ev) == Expected(CG_OK_POLICY, rule, "ingress")

    # ... and nothing else does.
    assert ping_fails(a.ns, b.ip4)
    other = event(pi, since, type="drop", src_identity=a_id, dst=str(b.ip4), protocol="icmp")
    assert decided(other) == predict(entries, a_id, b_id, ICMP, 8) == Expected(DROP_POLICY, 0, "ingress")
