"""ctypes mirrors of the map layouts in bpf/lib/maps.h, and conversions to plan values.

tests/kernel/test_layout.py compares these with the types BCC derives from the C source,
field by field, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

from datapath.plan import FLAG_IPV4, FLAG_IPV6, EndpointValue


class CgEndpoint(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("ipv4", ctypes.c_uint32),
        ("sandbox", ctypes.c_uint32),
        ("ipv6", ctypes.c_uint8 * 16),
        ("mac", ctypes.c_uint8 * 6),
        ("host_mac", ctypes.c_uint8 * 6),
        ("flags", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class CgIpKey(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class CgMetric(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class CgEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("type", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("l4proto", ctypes.c_uint8),
        ("ifindex", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("ethertype", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("arp_op", ctypes.c_uint16),
        ("len", ctypes.c_uint32),
        ("smac", ctypes.c_uint8 * 6),
        ("dmac", ctypes.c_uint8 * 6),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


MIRRORS = {
    "cg_endpoints": (ctypes.c_uint32, CgEndpoint),
    "cg_ips": (CgIpKey, CgEndpoint),
    "cg_metrics": (ctypes.c_uint32, CgMetric),
}


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def endpoint_struct(value: EndpointValue, ifindex: int) -> CgEndpoint:
    ep = CgEndpoint()
    ep.ifindex = ifindex
    ep.identity = value.identity
    ep.ipv4 = int.from_bytes(value.ipv4.packed, "little") if value.ipv4 else 0  # stays in network order
    ep.sandbox = value.sandbox
    if value.ipv6:
        ctypes.memmove(ep.ipv6, value.ipv6.packed, 16)
    ctypes.memmove(ep.mac, _mac_bytes(value.mac), 6)
    ctypes.memmove(ep.host_mac, _mac_bytes(value.host_mac), 6)
    ep.flags = value.flags
    return ep


def endpoint_value(ep: CgEndpoint) -> EndpointValue:
    return EndpointValue(
        ipv4=ipaddress.IPv4Address(ep.ipv4.to_bytes(4, "little")) if ep.flags & FLAG_IPV4 else None,
        ipv6=ipaddress.IPv6Address(bytes(ep.ipv6)) if ep.flags & FLAG_IPV6 else None,
        mac=_mac_str(bytes(ep.mac)),
        host_mac=_mac_str(bytes(ep.host_mac)),
        sandbox=ep.sandbox,
        identity=ep.identity,
    )


def ip_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> CgIpKey:
    key = CgIpKey()
    key.family = address.version
    ctypes.memmove(key.addr, address.packed, len(address.packed))
    return key


def key_address(key: CgIpKey) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(key.addr)
    if key.family == 4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


AF = {4: socket.AF_INET, 6: socket.AF_INET6}
