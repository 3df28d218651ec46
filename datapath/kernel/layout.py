"""ctypes mirrors of the map layouts in bpf/lib/maps.h, and conversions to plan values.

tests/kernel/test_layout.py compares these with the types BCC derives from the C source,
field by field, so the two cannot drift apart silently; tests/unit/test_bpf_constants.py
checks the constants below against the #defines of bpf/lib/*.h.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Sequence

from datapath.plan import FLAG_IPV4, FLAG_IPV6, EndpointValue
from datapath.policy.compile import PolicyKey, PolicyValue

# -- constants of bpf/lib/*.h that Python uses (tests/unit/test_bpf_constants.py checks them) --

CG_EP_F_IPV4 = FLAG_IPV4  # struct cg_endpoint.flags
CG_EP_F_IPV6 = FLAG_IPV6
CG_CFG_TRACE = 0x1  # struct cg_config.flags
CG_CFG_QUIET = 0x2
CG_CFG_LB_FLOWS = 0x4
CG_CT_F_REPLIED = 0x1  # struct cg_ct_value.flags
CG_CT_F_FIN_FWD = 0x2
CG_CT_F_FIN_REV = 0x4
CG_CT_F_RST = 0x8
CG_CT_F_PROXY = 0x10
CG_CT_SIDE_EGRESS = 0x1  # struct cg_ct_value.policy_sides
CG_CT_SIDE_INGRESS = 0x2


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


class CgPolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("subject", ctypes.c_uint32),
        ("peer", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),  # network byte order
    ]


class CgPolicyValue(ctypes.Structure):
    _fields_ = [
        ("deny", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("l7", ctypes.c_uint16),  # L7 filter id, 0 = none
        ("rule", ctypes.c_uint32),
    ]


class CgIpcacheKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),
    ]


class CgIpcacheValue(ctypes.Structure):
    _fields_ = [
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("tunnel_endpoint", ctypes.c_uint32),  # network byte order; 0 = none
        ("pad", ctypes.c_uint32),
    ]


class CgCtKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),  # network byte order
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class CgCtValue(ctypes.Structure):
    _fields_ = [
        ("expires", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("policy_sides", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
        ("policy_rev", ctypes.c_uint32),
        ("l7_egress", ctypes.c_uint16),
        ("l7_ingress", ctypes.c_uint16),
    ]


class CgConfig(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("policy_rev", ctypes.c_uint32),
        ("tcp_timeout_ns", ctypes.c_uint64),
        ("syn_timeout_ns", ctypes.c_uint64),
        ("close_timeout_ns", ctypes.c_uint64),
        ("other_timeout_ns", ctypes.c_uint64),
        ("tunnel_ifindex", ctypes.c_uint32),
        ("proxy_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
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
        ("rule", ctypes.c_uint32),
        ("ct_state", ctypes.c_uint8),
        ("side", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class CgLbKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class CgLbValue(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),  # network order
        ("count", ctypes.c_uint16),
        ("rev_nat", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


class CgLbRevnat(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class CgLbSockKey(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
    ]


class CgLbSockValue(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
    ]


class CgLbFlowKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class CgLbFlowValue(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
        ("rev_nat", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("expires", ctypes.c_uint64),
    ]


MIRRORS = {
    "cg_endpoints": (ctypes.c_uint32, CgEndpoint),
    "cg_ips": (CgIpKey, CgEndpoint),
    "cg_metrics": (ctypes.c_uint32, CgMetric),
    "cg_policy": (CgPolicyKey, CgPolicyValue),
    "cg_policy_exact": (CgPolicyKey, CgPolicyValue),
    "cg_ipcache": (CgIpcacheKey, CgIpcacheValue),
    "cg_ct": (CgCtKey, CgCtValue),
    "cg_config": (ctypes.c_uint32, CgConfig),
    "cg_lb_services": (CgLbKey, CgLbValue),
    "cg_lb_revnat": (ctypes.c_uint32, CgLbRevnat),
    "cg_lb_sock": (CgLbSockKey, CgLbSockValue),
    "cg_lb_netns": (ctypes.c_uint64, ctypes.c_uint32),
    "cg_lb_flows": (CgLbFlowKey, CgLbFlowValue),
}

# Maps whose size is a constant of bpf/lib/common.h (a test checks): a pin of another size is
# an older layout, replaced like one of other key or value sizes.
FIXED_ENTRIES = {"cg_metrics": 512}  # CG_METRICS_SIZE: code | direction << 8


def addr16(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address as the maps hold it: IPv4 in the first four of 16 bytes."""
    return address.packed.ljust(16, b"\0")


def addr_of(raw: bytes, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw[:16])


def lb_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, proto: int, slot: int) -> CgLbKey:
    key = CgLbKey()
    key.addr[:] = addr16(address)
    key.port = socket.htons(port)
    key.proto = proto
    key.family = address.version
    key.slot = slot
    return key


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


# -- policy entries --------------------------------------------------------------------------


# The policy key and value as flat records, packed many at once (native byte order like the
# Structures; dport goes in swapped, as the Structure field holds it).
_POLICY_KEY = struct.Struct("=IIIBBH")
_POLICY_VALUE = struct.Struct("=BxHI")
assert _POLICY_KEY.size == ctypes.sizeof(CgPolicyKey) and _POLICY_VALUE.size == ctypes.sizeof(CgPolicyValue)


def policy_keys(keys: Sequence[PolicyKey]) -> ctypes.Array[CgPolicyKey]:
    """Many keys as one array for a batch call, packed straight into its buffer (a fifth of
    the cost of setting each Structure's fields)."""
    out = (CgPolicyKey * len(keys))()
    pack, size = _POLICY_KEY.pack_into, _POLICY_KEY.size
    for i, k in enumerate(keys):
        if k.any_proto:
            pack(out, i * size, k.prefixlen, k.subject, k.peer, 1 if k.egress else 0, 0, 0)
        else:
            pack(out, i * size, k.prefixlen, k.subject, k.peer, 1 if k.egress else 0, k.proto, socket.htons(k.port))
    return out


def policy_values(values: Sequence[PolicyValue]) -> ctypes.Array[CgPolicyValue]:
    out = (CgPolicyValue * len(values))()
    pack, size = _POLICY_VALUE.pack_into, _POLICY_VALUE.size
    for i, v in enumerate(values):
        pack(out, i * size, 1 if v.deny else 0, v.l7, v.rule)
    return out


def policy_key(key: PolicyKey) -> CgPolicyKey:
    return policy_keys([key])[0]


def policy_key_value(raw: CgPolicyKey) -> PolicyKey:
    if raw.prefixlen <= 72:
        return PolicyKey(raw.subject, bool(raw.egress), raw.peer, 0, 0, 0, any_proto=True)
    bits = raw.prefixlen - 80
    return PolicyKey(raw.subject, bool(raw.egress), raw.peer, raw.proto, socket.ntohs(raw.dport), bits)


def policy_value(value: PolicyValue) -> CgPolicyValue:
    return policy_values([value])[0]


def policy_value_value(raw: CgPolicyValue) -> PolicyValue:
    return PolicyValue(bool(raw.deny), raw.rule, raw.l7)


def ipcache_key(prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> CgIpcacheKey:
    raw = CgIpcacheKey()
    raw.prefixlen = 32 + prefix.prefixlen
    raw.family = prefix.version
    ctypes.memmove(raw.addr, prefix.network_address.packed, len(prefix.network_address.packed))
    return raw


def ipcache_value(identity: int, tunnel_endpoint: ipaddress.IPv4Address | None) -> CgIpcacheValue:
    value = CgIpcacheValue()
    value.identity = identity
    value.tunnel_endpoint = int.from_bytes(tunnel_endpoint.packed, "little") if tunnel_endpoint else 0
    return value


def ipcache_tunnel_endpoint(value: CgIpcacheValue) -> ipaddress.IPv4Address | None:
    raw = int(value.tunnel_endpoint)
    return ipaddress.IPv4Address(raw.to_bytes(4, "little")) if raw else None


def ipcache_prefix(raw: CgIpcacheKey) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    size = 4 if raw.family == 4 else 16
    return ipaddress.ip_network((bytes(raw.addr)[:size], raw.prefixlen - 32))
