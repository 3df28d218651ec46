"""Micro tier: BPF_PROG_TEST_RUN of the real datapath programs on fixed packets.

The programs come from datapath.kernel.loader.Datapath, compiled into a throwaway pin dir
(`/sys/fs/bpf/cgb…`, removed afterwards); an empty SCHED_CLS program compiled in the same
run is the yardstick, and every result is a ratio to it. No traffic, no links: test_run
runs the program on the loopback device of our own namespace, so the endpoint entry the
program looks up is keyed by ifindex 1, and the redirect it returns is never carried out.

Packets (from endpoint A, which sits on ifindex 1):
  established  TCP ACK A->B:80 whose flow is in conntrack (sender egress + receiver ingress)
  reply        TCP ACK A->B whose reverse flow is in conntrack
  new          TCP SYN A->B:80 whose SYN lifetime ends before it starts (2^64 - 1 ns from now
               wraps to a deadline 1 ns ago), so every repetition is a new flow
  new-monitored  the same while a monitor shows verdicts: each new flow also writes an event
  denied       TCP SYN A->C:80 that no rule allows (dropped, with a verdict event)
  non-ip       an Ethernet frame of ethertype 0x88b5 (dropped, with a drop event)
Policy and conntrack maps hold 1, 1k or 100k filler entries besides those the packets
need, the ipcache as many up to 10k (one per filler identity; it holds 64k at most).
The many-flow variant sends 10k established flows, one per call. Every case but new-monitored
runs with the configuration the agent writes while no monitor listens (CG_CFG_QUIET: no
events for allowed new flows; denials always report).

A program that forwards rewrites the MACs and decrements the TTL of the very skb that
test_run repeats, so the MACs are chosen to make the rewrite a fixed point and each
call repeats at most 200 times from TTL 255.
"""

from __future__ import annotations

import ctypes
import ipaddress
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

from bench.common import Cleanup, log, machine, new_tag, summary
from datapath.kernel.bpfsys import ProgTester
from tests.kernel.helpers import ethernet, ipv4_packet

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
REPEAT = 200  # per call; TTL 255 stays above 1
MANY_FLOWS = 10_000
SIZES = (1, 1_000, 100_000)
IDENTITIES = 10_000  # filler identities (ipcache entries) at most
ID_A, ID_B, ID_C = 1000, 1001, 1002
ADDR = {"A": "198.18.250.2", "B": "198.18.250.3", "C": "198.18.250.4"}
MAC1, MAC2 = "02:cb:00:00:00:01", "02:cb:00:00:00:02"
FAKE_IFINDEX = {"B": 0x7FFF0002, "C": 0x7FFF0003}  # never looked up: redirects are not carried out
EMPTY_PROGRAM = b"int cg_empty(struct __sk_buff *skb) { return 0; }"
EXPECT = {"established": TC_ACT_REDIRECT, "reply": TC_ACT_REDIRECT, "new": TC_ACT_REDIRECT,
          "new-monitored": TC_ACT_REDIRECT, "denied": TC_ACT_SHOT, "non-ip": TC_ACT_SHOT}
EXPIRED = 2**64 - 1  # a lifetime that wraps the deadline to just before now


# -- packets ---------------------------------------------------------------------------------


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int, ttl: int = 255) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1 if flags & 0x10 else 0, 5 << 4, flags, 65535, 0, 0)
    # to A's host MAC, from A's MAC
    return ethernet(MAC2, MAC1, 0x0800, ipv4_packet(src, dst, 6, tcp, ttl=ttl))


def non_ip_packet() -> bytes:
    return ethernet(MAC2, MAC1, 0x88B5, bytes(46))


# -- maps ------------------------------------------------------------------------------------


class Maps:
    """The throwaway datapath's maps, filled with what the packets need plus fillers."""

    def __init__(self, dp: Any) -> None:
        from datapath.kernel import layout

        self.dp = dp
        self.layout = layout
        self.fillers = 0

    def endpoints(self) -> None:
        from datapath.plan import EndpointValue

        L = self.layout
        values = {
            "A": EndpointValue(ipaddress.IPv4Address(ADDR["A"]), None, MAC1, MAC2, 0, ID_A),
            # B's and C's MACs make the forward rewrite (dst = B.mac, src = B.host_mac) a fixed point
            "B": EndpointValue(ipaddress.IPv4Address(ADDR["B"]), None, MAC2, MAC1, 0, ID_B),
            "C": EndpointValue(ipaddress.IPv4Address(ADDR["C"]), None, MAC2, MAC1, 0, ID_C),
        }
        self.dp.endpoints[ctypes.c_uint32(1)] = L.endpoint_struct(values["A"], 1)
        self.dp.ips[L.ip_key(ipaddress.IPv4Address(ADDR["A"]))] = L.endpoint_struct(values["A"], 1)
        for name in ("B", "C"):
            self.dp.ips[L.ip_key(ipaddress.IPv4Address(ADDR[name]))] = L.endpoint_struct(values[name],
                                                                                      FAKE_IFINDEX[name])

    def policy(self) -> int:
        """The real compiler's entries for: B accepts TCP/80 from A; A may send TCP/80 to B."""
        from datapath.labels import from_runtime
        from datapath.policy import parse_rules
        from datapath.policy.compile import ExactVerdicts, compile_all

        rules = parse_rules([
            {"endpointSelector": {"matchLabels": {"app": "b"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                          "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
            {"endpointSelector": {"matchLabels": {"app": "a"}},
             "egress": [{"toEndpoints": [{"matchLabels": {"app": "b"}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
        ])
        labels = {ID_A: from_runtime({"app": "a"}, "container"), ID_B: from_runtime({"app": "b"}, "container"),
                  ID_C: from_runtime({"app": "c"}, "container")}
        entries = compile_all(labels, rules, labels)
        exact, _ = ExactVerdicts().change(entries, ())  # as the agent's executor derives them
        for table, items in ((self.dp.policy, entries), (self.dp.policy_exact, exact)):
            for key, value in items.items():
                table[self.layout.policy_key(key)] = self.layout.policy_value(value)
        return len(entries)

    def ct_entry(self, src: str, dst: str, sport: int, dport: int, replied: bool = True) -> None:
        key = self.layout.CgCtKey()
        ctypes.memmove(key.saddr, socket.inet_aton(src), 4)
        ctypes.memmove(key.daddr, socket.inet_aton(dst), 4)
        key.sport, key.dport = socket.htons(sport), socket.htons(dport)
        key.proto, key.family = 6, 4
        value = self.layout.CgCtValue()
        value.expires = time.monotonic_ns() + 3600 * 10**9
        value.src_identity, value.dst_identity = ID_A, ID_B
        value.flags = 1 if replied else 0
        self.dp.ct[key] = value

    def config(self, syn_lifetime_ns: int = 0, monitored: bool = False) -> None:
        cfg = self.layout.CgConfig()
        cfg.syn_timeout_ns = syn_lifetime_ns
        cfg.policy_rev = 1  # as after the agent's first policy write: established flows cache verdicts
        cfg.flags = 0 if monitored else self.layout.CG_CFG_QUIET
        self.dp.config[ctypes.c_uint32(0)] = cfg

    def grow(self, total: int) -> None:
        """Add fillers until each of policy, ipcache and conntrack holds `total` of them."""
        start, self.fillers = self.fillers, total
        if total <= start:
            return
        n = total - start
        L = self.layout
        pk, pv = (L.CgPolicyKey * n)(), (L.CgPolicyValue * n)()
        idents = max(0, min(total, IDENTITIES) - min(start, IDENTITIES))
        ik, iv = (L.CgIpcacheKey * idents)(), (L.CgIpcacheValue * idents)()
        ck, cv = (L.CgCtKey * n)(), (L.CgCtValue * n)()
        expires = time.monotonic_ns() + 3600 * 10**9
        for j, i in enumerate(range(start, total)):
            k = pk[j]  # subjects and peers no packet has: 0x00f00000 + ..., 10k peer identities
            k.prefixlen, k.subject, k.peer = 96, 0x00F00000 + i // 10_000, 0x00E00000 + i % 10_000
            k.egress, k.proto, k.dport = i & 1, 6, socket.htons(1 + i % 65000)
            pv[j].rule = 1
            if j < idents:
                prefix = filler_prefix(i)
                ik[j].prefixlen, ik[j].family = 32 + prefix.prefixlen, 4
                ctypes.memmove(ik[j].addr, prefix.network_address.packed, 4)
                iv[j].identity = 0x00E00000 + i
            c = ck[j]
            ctypes.memmove(c.saddr, (ipaddress.IPv4Address("198.19.0.0") + i % 65536).packed, 4)
            ctypes.memmove(c.daddr, ipaddress.IPv4Address("198.19.255.254").packed, 4)
            c.sport, c.dport, c.proto, c.family = socket.htons(1024 + i // 65536), socket.htons(80), 6, 4
            cv[j].expires, cv[j].flags = expires, 1
        # the fillers are exact entries with no wildcard beside them: each is its own verdict
        for table, keys, values in ((self.dp.policy, pk, pv), (self.dp.policy_exact, pk, pv),
                                    (self.dp.ipcache, ik, iv), (self.dp.ct, ck, cv)):
            if len(keys):
                batch_update(table, keys, values)


def filler_prefix(i: int) -> ipaddress.IPv4Network:
    """The i-th distinct prefix inside 198.19.0.0/16: every /32, then every /31, /30, ..."""
    base = int(ipaddress.IPv4Address("198.19.0.0"))
    for plen in range(32, 15, -1):
        count = 1 << (plen - 16)
        if i < count:
            return ipaddress.IPv4Network((base + (i << (32 - plen)), plen))
        i -= count
    raise ValueError("198.19.0.0/16 holds no more distinct prefixes")


def batch_update(table: Any, keys: Any, values: Any, chunk: int = 4096) -> None:
    ktype, vtype = type(keys)._type_, type(values)._type_
    for start in range(0, len(keys), chunk):
        n = min(chunk, len(keys) - start)
        table.items_update_batch((ktype * n).from_buffer(keys, start * ctypes.sizeof(ktype)),
                                 (vtype * n).from_buffer(values, start * ctypes.sizeof(vtype)))


# -- measuring -------------------------------------------------------------------------------


def per_run_ns(tester: ProgTester, packet: bytes, calls: int) -> float:
    """Mean kernel-measured ns per repetition over `calls` calls of REPEAT repetitions."""
    return sum(tester.run(packet, REPEAT).duration_ns for _ in range(calls)) / calls


def per_packet_ns(tester: ProgTester, packets: list[bytes]) -> float:
    """Median kernel-measured ns of single runs over many different packets."""
    times = sorted(tester.run(p, 1).duration_ns for p in packets)
    return float(times[len(times) // 2])


def run_micro(samples: int = 15, calls: int = 250, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    from bcc import BPF

    from datapath.kernel.loader import Datapath, remove_pins

    tag = new_tag()
    pin_dir = Path("/sys/fs/bpf") / tag
    out: dict[str, Any] = {"tier": "micro", "machine": machine(), "started": time.time(), "samples": [],
                           "settings": {"samples": samples, "calls": calls, "repeat": REPEAT, "sizes": list(sizes),
                                        "many_flows": MANY_FLOWS}}
    with Cleanup() as cleanup:
        cleanup.push(f"pins {pin_dir}", remove_pins, pin_dir)
        started = time.monotonic()
        dp = Datapath(pin_dir)
        cleanup.push("datapath handles", dp.close)
        out["compile_s"] = time.monotonic() - started
        empty_bpf = BPF(text=EMPTY_PROGRAM)
        cleanup.push("empty program", empty_bpf.cleanup)
        empty = ProgTester(empty_bpf.load_func(b"cg_empty", BPF.SCHED_CLS).fd)
        prog = ProgTester(dp.programs["cg_from_container"].fd)

        maps = Maps(dp)
        maps.endpoints()
        out["policy_entries_needed"] = maps.policy()
        maps.ct_entry(ADDR["A"], ADDR["B"], 40000, 80)  # established
        maps.ct_entry(ADDR["B"], ADDR["A"], 80, 40001)  # reply: B started it
        packets = {
            "established": tcp_packet(ADDR["A"], ADDR["B"], 40000, 80, 0x10),
            "reply": tcp_packet(ADDR["A"], ADDR["B"], 40001, 80, 0x10),
            "new": tcp_packet(ADDR["A"], ADDR["B"], 40002, 80, 0x02),
            "new-monitored": tcp_packet(ADDR["A"], ADDR["B"], 40002, 80, 0x02),
            "denied": tcp_packet(ADDR["A"], ADDR["C"], 40003, 80, 0x02),
            "non-ip": non_ip_packet(),
        }
        many = [tcp_packet(ADDR["A"], ADDR["B"], 10000 + i, 80, 0x10) for i in range(MANY_FLOWS)]
        for i in range(MANY_FLOWS):
            maps.ct_entry(ADDR["A"], ADDR["B"], 10000 + i, 80)
        rng = random.Random(1)
        rng.shuffle(many)

        for size in sizes:
            maps.grow(size)
            for case, packet in packets.items():
                maps.config(EXPIRED if case.startswith("new") else 0, monitored=case == "new-monitored")
                got = prog.run(packet, 1).retval
                if got != EXPECT[case]:
                    raise RuntimeError(f"{case}: the program returned {got}, expected {EXPECT[case]}")
                for k in range(samples):
                    base = per_run_ns(empty, packet, calls)
                    value = per_run_ns(prog, packet, calls)
                    out["samples"].append({"size": size, "case": case, "k": k, "empty_ns": base, "ns": value})
            maps.config()
            for k in range(max(3, samples // 3)):  # many flows, one run per call: each call its own flow
                base = per_packet_ns(empty, many)
                value = per_packet_ns(prog, many)
                single = per_packet_ns(prog, [packets["established"]] * len(many))
                out["samples"].append({"size": size, "case": "many-flows", "k": k, "empty_ns": base, "ns": value,
                                       "single_flow_ns": single})
            log.info("micro: %d fillers done", size)
    out["seconds"] = time.time() - out["started"]
    out["summary"] = summarize(out["samples"])
    return out


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(s["case"], s["size"]) for s in samples}, key=lambda k: (k[0], k[1]))
    for case, size in keys:
        mine = [s for s in samples if s["case"] == case and s["size"] == size]
        row = {"case": case, "size": size, "ns": summary([s["ns"] for s in mine]),
               "empty_ns": summary([s["empty_ns"] for s in mine]),
               "ratio": summary([s["ns"] / s["empty_ns"] for s in mine if s["empty_ns"]])}
        if case == "many-flows":
            row["vs_single_flow"] = summary([s["ns"] / s["single_flow_ns"] for s in mine if s["single_flow_ns"]])
        rows.append(row)
    return rows
