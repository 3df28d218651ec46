"""What the L7 proxy reads of the datapath: the conntrack entry of a redirected connection (its
parties' identities and both sides' L7 filters), by the connection's tuple, from the pinned
cg_ct map. One bpf(2) lookup per call; standard library and the layout mirror only (no BCC),
so the proxy process starts fast.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from datapath.kernel import layout
from datapath.kernel.bpfsys import MapReader, map_info, open_pinned

MARK_FROM_PROXY = 0xA00  # bpf/lib/common.h CG_MARK_FROM_PROXY


def mark_for(identity: int) -> int:
    """SO_MARK of an upstream socket speaking for `identity` (bpf/lib/proxy.h cg_mark_identity)."""
    if not 0 <= identity < 1 << 28:
        raise ValueError(f"identity {identity} does not fit a proxy mark")
    return ((identity >> 8) << 12) | MARK_FROM_PROXY | (identity & 0xFF)


@dataclass(frozen=True)
class ProxiedFlow:
    src_identity: int
    dst_identity: int
    l7_egress: int  # filter ids, 0 = that side does not filter
    l7_ingress: int


class ConntrackReader:
    """Lookups in the pinned cg_ct, following it when an agent made it again (it started without its
    pins): the datapath then writes the new map, and the old one, still open here, no longer changes."""

    def __init__(self, pin_dir: Path) -> None:
        self._path = str(pin_dir / "cg_ct")
        self._reader = MapReader(self._path, ctypes.sizeof(layout.CgCtValue))
        self._id = map_info(self._reader.fd)[0]
        self._key = layout.CgCtKey()
        self._monotonic = time.clock_gettime_ns

    def _follow(self) -> bool:
        """Open the map pinned now if it is another one than ours; True if it was."""
        try:
            fd = open_pinned(self._path)
        except OSError:
            return False
        try:
            pinned = map_info(fd)[0]
        finally:
            os.close(fd)
        if pinned == self._id:
            return False
        self._reader.close()
        self._reader = MapReader(self._path, ctypes.sizeof(layout.CgCtValue))
        self._id = map_info(self._reader.fd)[0]
        return True

    def lookup(self, client: tuple[str, int], original: tuple[str, int]) -> ProxiedFlow | None:
        """The live entry of the TCP flow client -> original that the datapath sent to the proxy."""
        src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(original[0])
        if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped:
            src = src.ipv4_mapped
        if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped:
            dst = dst.ipv4_mapped
        key = self._key
        ctypes.memset(ctypes.addressof(key), 0, ctypes.sizeof(key))
        ctypes.memmove(key.saddr, src.packed, len(src.packed))
        ctypes.memmove(key.daddr, dst.packed, len(dst.packed))
        key.sport, key.dport = socket.htons(client[1]), socket.htons(original[1])
        key.proto, key.family = socket.IPPROTO_TCP, src.version
        raw = self._reader.lookup(key)
        if raw is None and self._follow():  # a miss: the map may have been made again
            raw = self._reader.lookup(key)
        if raw is None:
            return None
        ct = layout.CgCtValue.from_buffer_copy(raw)
        if not ct.flags & layout.CG_CT_F_PROXY or ct.expires <= self._monotonic(time.CLOCK_MONOTONIC):
            return None
        return ProxiedFlow(ct.src_identity, ct.dst_identity, ct.l7_egress, ct.l7_ingress)

    def close(self) -> None:
        self._reader.close()
