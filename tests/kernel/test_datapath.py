"""The eBPF datapath on real veths: delivery, ARP/ND answers, anti-spoofing, events, counters.

Each test builds its endpoints in fresh `cgns…` namespaces; frames a hostile container could
send are written with AF_PACKET from inside the attacker's namespace.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from datapath import events, plan, reasons
from datapath.plan import EndpointEntry

from .conftest import Guest, Instance
from .helpers import (
    VERDICT,
    Capture,
    arp_frame,
    counter_delta,
    ethernet,
    in_ns,
    ipv6_frame,
    neighbours,
    ping,
    run,
    send_frames,
    ttls,
    udp_frame,
    udp_send_from_host,
    wait_until,
)

pytestmark = pytest.mark.kernel

CG_OK_LOCAL, CG_OK_STACK, CG_OK_TO_EP, CG_OK_ARP, CG_OK_ND = (
    VERDICT[n] for n in ("CG_OK_LOCAL", "CG_OK_STACK", "CG_OK_TO_EP", "CG_OK_ARP", "CG_OK_ND")
)
DROP_INVALID_SMAC, DROP_INVALID_SIP, DROP_UNKNOWN_L3, DROP_NO_ENDPOINT, DROP_INVALID_ARP = (
    VERDICT[n]
    for n in ("DROP_INVALID_SMAC", "DROP_INVALID_SIP", "DROP_UNKNOWN_L3", "DROP_NO_ENDPOINT", "DROP_INVALID_ARP")
)
DROP_ROUTER_ADV, DROP_NO_IPV6 = VERDICT["DROP_ROUTER_ADV"], VERDICT["DROP_NO_IPV6"]
BROADCAST = "ff:ff:ff:ff:ff:ff"

Guests = Callable[..., Guest]


def token(kind: str) -> str:
    return f"cg-{kind}-{secrets.token_hex(6)}"


def legit_udp(src: Guest, dst: Guest, port: int, payload: str, version: int = 4) -> bytes:
    """What src's stack would send to dst: its own MAC and address, to the gateway MAC."""
    saddr, daddr = (src.ip4, dst.ip4) if version == 4 else (src.ip6, dst.ip6)
    return udp_frame(src.ep.mac, src.ep.host_mac, saddr, daddr, port, payload.encode())


def drop_event(
    inst: Instance, since: int, reason_code: int, guest: Guest, extra: Callable[[dict[str, Any]], bool] = lambda e: True
) -> dict[str, Any]:
    return inst.events.wait_for(
        lambda e: e["code"] == reason_code and e["ifindex"] == guest.ifindex and extra(e),
        since=since,
        what=f"a '{reasons.name(reason_code)}' event from {guest.ep.host_ifname}",
    )


# -- delivery -------------------------------------------------------------------------------


def test_ipv4_between_endpoints_is_redirected_with_ttl_decrement(dpi: Instance, guests: Guests) -> None:
    a, b = guests(), guests()
    before = dpi.kernel.counters()

    out = ping(a.ns, b.ip4, count=3)

    assert ttls(out) == {63}, out  # routed once ...
    packets, size = counter_delta(before, dpi.dp.counters(), CG_OK_LOCAL)
    assert packets >= 6 and size >= 6 * 98  # ... by the BPF redirect (3 requests, 3 replies), not host forwarding


def test_tcp_exchange_between_endpoints(dpi: Instance, guests: Guests) -> None:
    a, b = guests(), guests()
    port = random.randrange(20000, 60000)
    server = subprocess.Popen(
        ["ip", "netns", "exec", b.ns, "sh", "-c", f'printf "pong from b\\n" | nc -N -l {b.ip4} {port}'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: f":{port}" in in_ns(b.ns, "ss", "-Hltn").stdout, what="nc listening")
        client = in_ns(a.ns, "nc", "-N", "-w", "3", str(b.ip4), str(port), stdin="ping from a\n")
        received, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert client.stdout == "pong from b\n"
    assert received == "ping from a\n"


def test_host_and_container_reach_each_other(dpi: Instance, guests: Guests) -> None:
    a = guests()
    before = dpi.dp.counters()

    assert ttls(ping(None, a.ip4)) == {64}  # host -> container through the host veth
    assert ttls(ping(a.ns, dpi.gateway(4).ip)) == {64}  # gateway address lives on cg_<instance>
    assert ttls(ping(a.ns, dpi.gateway(6).ip)) == {64}

    after = dpi.kernel.counters()
    assert counter_delta(before, after, CG_OK_TO_EP)[0] >= 1
    assert counter_delta(before, after, CG_OK_STACK)[0] >= 2


def test_arp_resolves_gateway_and_peers_to_the_host_veth_mac(dpi: Instance, guests: Guests) -> None:
    a, b = guests(ipv6=False), guests(ipv6=False)
    before = dpi.dp.counters()

    ping(a.ns, dpi.gateway(4).ip)
    ping(a.ns, b.ip4)

    table = neighbours(a.ns)
    assert table.get(str(dpi.gateway(4).ip)) == a.ep.host_mac
    assert table.get(str(b.ip4)) == a.ep.host_mac  # a peer is on-link but still reached via the gateway MAC
    assert counter_delta(before, dpi.dp.counters(), CG_OK_ARP)[0] >= 2


def test_ipv6_dual_stack_endpoints(dpi: Instance, guests: Guests) -> None:
    a, b = guests(), guests()
    before = dpi.dp.counters()

    out = ping(a.ns, b.ip6, count=2)

    assert ttls(out) == {63}, out  # hop limit decremented once ...
    assert counter_delta(before, dpi.dp.counters(), CG_OK_LOCAL)[0] >= 4  # ... by the BPF redirect
    assert ping(a.ns, b.ip4)  # the same endpoints keep IPv4
    assert ttls(ping(None, a.ip6)) == {64}
    assert ttls(ping(a.ns, dpi.gateway(6).ip)) == {64}
    table = neighbours(a.ns)
    assert table.get(str(b.ip6)) == a.ep.host_mac  # neighbour solicitation answered by BPF
    assert table.get(str(dpi.gateway(6).ip)) == a.ep.host_mac
    assert counter_delta(before, dpi.dp.counters(), CG_OK_ND)[0] >= 2  # a asked for b, b asked for a


# -- anti-spoofing ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_forged_source_ip_is_dropped(dpi: Instance, guests: Guests, version: int) -> None:
    attacker, victim, impersonated = guests(), guests(), guests()
    port = random.randrange(20000, 60000)
    spoof, stop = token("spoof"), token("stop")
    forged = impersonated.ip4 if version == 4 else impersonated.ip6
    victim_ip = victim.ip4 if version == 4 else victim.ip6
    frame = udp_frame(attacker.ep.mac, attacker.ep.host_mac, forged, victim_ip, port, spoof.encode())
    since, before = dpi.events.mark(), dpi.dp.counters()

    with Capture(victim.ns, stop, [spoof]) as capture:
        send_frames(attacker.ns, frame)
        ev = drop_event(dpi, since, DROP_INVALID_SIP, attacker, lambda e: e.get("dport") == port)
        send_frames(attacker.ns, legit_udp(attacker, victim, port, stop, version))  # control: real source
        seen, stopped = capture.result()

    assert ev["reason"] == "invalid source IP"
    assert ev["direction"] == "from-endpoint"
    assert (ev["src"], ev["dst"]) == (str(forged), str(victim_ip))
    assert ev["protocol"] == "udp" and ev["src_mac"] == attacker.ep.mac
    assert stopped, "the legitimate control frame never reached the victim"
    assert spoof not in seen, "the victim received a frame with a forged source address"
    assert counter_delta(before, dpi.dp.counters(), DROP_INVALID_SIP) == (1, len(frame))


def test_sibling_interfaces_of_one_container_may_use_each_others_address(dpi: Instance, guests: Guests) -> None:
    sandbox = f"/var/run/netns/cgtest-{secrets.token_hex(6)}"
    eth0, eth1, peer = guests(sandbox=sandbox), guests(sandbox=sandbox), guests()
    marker = token("sibling")

    with Capture(peer.ns, marker, []) as capture:
        send_frames(eth0.ns, udp_frame(eth0.ep.mac, eth0.ep.host_mac, eth1.ip4, peer.ip4, 9, marker.encode()))
        _, arrived = capture.result()

    assert arrived, "a container's own second address was treated as spoofed"


def test_forged_source_mac_is_dropped(dpi: Instance, guests: Guests) -> None:
    attacker, victim = guests(), guests()
    port = random.randrange(20000, 60000)
    spoof, stop = token("smac"), token("stop")
    forged_mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    frame = udp_frame(forged_mac, attacker.ep.host_mac, attacker.ip4, victim.ip4, port, spoof.encode())
    since, before = dpi.events.mark(), dpi.dp.counters()

    with Capture(victim.ns, stop, [spoof]) as capture:
        send_frames(attacker.ns, frame, frame)
        ev = drop_event(dpi, since, DROP_INVALID_SMAC, attacker, lambda e: e.get("dport") == port)
        send_frames(attacker.ns, legit_udp(attacker, victim, port, stop))
        seen, stopped = capture.result()

    assert ev["reason"] == "invalid source MAC" and ev["src_mac"] == forged_mac
    assert stopped and spoof not in seen
    assert counter_delta(before, dpi.kernel.counters(), DROP_INVALID_SMAC) == (2, 2 * len(frame))


def test_unknown_ethertype_is_dropped(dpi: Instance, guests: Guests) -> None:
    a = guests()
    since, before = dpi.events.mark(), dpi.dp.counters()

    send_frames(a.ns, ethernet(a.ep.host_mac, a.ep.mac, 0x88B5, b"cellgate local experimental"))

    ev = drop_event(dpi, since, DROP_UNKNOWN_L3, a)
    assert ev["reason"] == "unsupported L3 protocol"
    assert ev["ethertype"] == "0x88b5" and ev["src_mac"] == a.ep.mac
    assert counter_delta(before, dpi.dp.counters(), DROP_UNKNOWN_L3)[0] == 1


def test_spoofed_arp_is_dropped(dpi: Instance, guests: Guests) -> None:
    attacker, victim = guests(ipv6=False), guests(ipv6=False)
    gw = dpi.gateway(4).ip
    mac = attacker.ep.mac
    claim_victim = arp_frame(mac, BROADCAST, 2, mac, victim.ip4, BROADCAST, victim.ip4)  # gratuitous reply
    claim_gateway = arp_frame(mac, BROADCAST, 1, mac, gw, "00:00:00:00:00:00", victim.ip4)  # request as the gateway
    since, before = dpi.events.mark(), dpi.dp.counters()

    send_frames(attacker.ns, claim_victim, claim_gateway)

    replies = drop_event(dpi, since, DROP_INVALID_ARP, attacker, lambda e: e.get("arp_op") == "reply")
    requests = drop_event(dpi, since, DROP_INVALID_ARP, attacker, lambda e: e.get("arp_op") == "request")
    assert replies["reason"] == "invalid ARP" and replies["src"] == str(victim.ip4)
    assert requests["src"] == str(gw)
    assert counter_delta(before, dpi.dp.counters(), DROP_INVALID_ARP)[0] == 2
    assert counter_delta(before, dpi.dp.counters(), CG_OK_ARP)[0] == 0  # no answer to a spoofer
    # The host learnt nothing: the only entry for the victim is our permanent one on its own veth.
    host_view = run("ip", "neigh", "show", "to", str(victim.ip4)).stdout.splitlines()
    assert [line.split()[2] for line in host_view] == [victim.ep.host_ifname], host_view
    assert victim.ep.mac in host_view[0] and "PERMANENT" in host_view[0]
    # The victim is still reached at its real MAC.
    assert ttls(ping(attacker.ns, victim.ip4)) == {63}


def test_counters_move_for_delivered_and_dropped_packets(dpi: Instance, guests: Guests) -> None:
    a, b = guests(ipv6=False), guests(ipv6=False)
    ping(a.ns, b.ip4)  # resolve neighbours first so the counted window holds only our packets
    bad = ethernet(a.ep.host_mac, a.ep.mac, 0x88B5, b"x")
    since, before = dpi.events.mark(), dpi.kernel.counters()

    ping(a.ns, b.ip4, count=4)
    send_frames(a.ns, bad, bad, bad)
    drop_event(dpi, since, DROP_UNKNOWN_L3, a)
    wait_until(lambda: counter_delta(before, dpi.dp.counters(), DROP_UNKNOWN_L3)[0] == 3, what="3 drops counted")

    after = dpi.kernel.counters()  # the port's view: the same pinned per-CPU map, summed
    assert counter_delta(before, after, CG_OK_LOCAL) == (8, 8 * 98)  # 4 echo requests + 4 replies, 98 bytes each
    assert counter_delta(before, after, DROP_UNKNOWN_L3) == (3, 3 * 60)
    assert all(reasons.name(code) != f"unknown verdict {code}" for code in after)


def test_interface_without_endpoint_entry_fails_closed(dpi: Instance, guests: Guests) -> None:
    orphan = guests(skip=(EndpointEntry,))  # programs attached, the endpoint map never filled
    peer = guests()
    observed = dpi.kernel.observe(plan.keys(orphan.objects()))
    assert plan.Programs(orphan.ep.host_ifname, dpi.dp.revision) in observed
    assert not any(isinstance(o, EndpointEntry) for o in observed)
    port = random.randrange(20000, 60000)
    since, before = dpi.events.mark(), dpi.dp.counters()

    send_frames(orphan.ns, legit_udp(orphan, peer, port, "from an orphan"))
    udp_send_from_host(orphan.ip4, port, b"to an orphan")

    out_ev = drop_event(
        dpi, since, DROP_NO_ENDPOINT, orphan, lambda e: e["direction"] == "from-endpoint" and e.get("dport") == port
    )
    in_ev = drop_event(
        dpi, since, DROP_NO_ENDPOINT, orphan, lambda e: e["direction"] == "to-endpoint" and e.get("dport") == port
    )
    assert out_ev["reason"] == "no endpoint for interface"
    assert (out_ev["src"], out_ev["dst"]) == (str(orphan.ip4), str(peer.ip4))
    assert (in_ev["dst"], in_ev["src_identity"], in_ev["dst_identity"]) == (str(orphan.ip4), 0, 0)
    assert counter_delta(before, dpi.dp.counters(), DROP_NO_ENDPOINT)[0] >= 2
    assert counter_delta(before, dpi.dp.counters(), CG_OK_LOCAL)[0] == 0


def test_each_poll_hands_events_to_its_own_sink(dpi: Instance, guests: Guests) -> None:
    a = guests(ipv6=False)
    dpi.events.mark()  # registers the shared log's sink first
    mine: list[bytes] = []
    marker = 0x88B6

    send_frames(a.ns, ethernet(a.ep.host_mac, a.ep.mac, marker, b"for the second reader"))

    def arrived() -> bool:
        dpi.dp.poll_events(mine.append, 50)
        return any(events.decode(raw)["ethertype"] == f"0x{marker:04x}" for raw in mine)

    wait_until(arrived, what="the event in the sink passed to this poll")


def test_ipv6_from_an_ipv4_only_endpoint_and_router_advertisements_are_dropped(dpi: Instance, guests: Guests) -> None:
    v4only, dual = guests(ipv6=False), guests()
    group = f"{secrets.randbelow(0xF000) + 0x1000:x}"  # four hex digits, as `ip` and events print them
    link_local = f"fe80::{group}"
    # A router advertisement for a prefix of its own, as a rogue container would announce itself.
    tag = f"fd63:67ee:{group}:"
    prefix = ipaddress.IPv6Network(f"{tag}:/64")
    prefix_option = bytes([3, 4, 64, 0xC0]) + (86400).to_bytes(4, "big") * 2 + bytes(4) + prefix.network_address.packed
    ra = bytes([134, 0, 0, 0, 64, 0]) + (1800).to_bytes(2, "big") + bytes(8) + prefix_option
    port = random.randrange(20000, 60000)
    since = dpi.events.mark()

    send_frames(
        dual.ns, ipv6_frame(dual.ep.mac, "33:33:00:00:00:01", link_local, "ff02::1", 58, ra, hop_limit=255, csum_at=2)
    )
    send_frames(v4only.ns, udp_frame(v4only.ep.mac, v4only.ep.host_mac, link_local, dual.ip6, port, b"v6"))

    ra_ev = drop_event(dpi, since, DROP_ROUTER_ADV, dual)
    v6_ev = drop_event(dpi, since, DROP_NO_IPV6, v4only, lambda e: e.get("dport") == port)
    assert ra_ev["reason"] == "router advertisement from endpoint" and ra_ev["icmp_type"] == 134
    assert v6_ev["reason"] == "IPv6 not enabled on endpoint" and v6_ev["src"] == link_local
    assert run("ip", "-6", "route", "show", str(prefix)).stdout == ""
    assert tag not in run("ip", "-6", "addr", "show").stdout
