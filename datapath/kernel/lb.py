"""Handlers of the load-balancing kinds: services in cg_lb_services/cg_lb_revnat, the network
namespaces the socket programs serve (cg_lb_netns), and the VIPs' `unreachable` routes.

A service changes without a gap and without touching any other: new backend slots are written
before a larger count, a smaller count before the slots it drops are deleted.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import subprocess
from collections.abc import Iterable, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from datapath import naming
from datapath.kernel import layout
from datapath.kernel.context import KernelContext, OnContext, attr
from datapath.kernel.netns import netns_cookie
from datapath.plan import Key, LbService, ServedNetns, VipRoute
from datapath.services import Backend, Frontend

log = logging.getLogger(__name__)
RTN_UNREACHABLE = 7
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RT_TABLE_MAIN = 254


class LbServices(OnContext):
    kind = LbService.kind

    def observe(self, key: Key) -> LbService | None:
        if self.ctx.dp is None:
            return None
        return self._read(Frontend.parse(key[1]))

    def _read(self, fe: Frontend) -> LbService | None:
        table = self.ctx.need_dp().lb_services
        try:
            head = layout.CgLbValue.from_buffer_copy(bytes(table[layout.lb_key(fe.address, fe.port, fe.proto, 0)]))
        except KeyError:
            return None
        backends = []
        for slot in range(1, head.count + 1):
            try:
                leaf = table[layout.lb_key(fe.address, fe.port, fe.proto, slot)]
            except KeyError:
                continue  # a torn service: the diff rewrites it
            raw = layout.CgLbValue.from_buffer_copy(bytes(leaf))
            backends.append(Backend(layout.addr_of(bytes(raw.addr), fe.address.version), socket.ntohs(raw.port)))
        return LbService(fe, head.rev_nat, tuple(backends), head.flags)

    def observe_all(self) -> Iterable[LbService]:
        if self.ctx.dp is None:
            return []
        heads = []
        for key, _value in list(self.ctx.dp.lb_services.items()):
            k = layout.CgLbKey.from_buffer_copy(bytes(key))
            if k.slot == 0 and k.family in (4, 6):
                heads.append(Frontend(layout.addr_of(bytes(k.addr), k.family), socket.ntohs(k.port), k.proto))
        return [svc for fe in heads if (svc := self._read(fe)) is not None]

    def add(self, obj: LbService) -> None:
        self.change(None, obj)

    def change(self, old: LbService | None, new: LbService) -> None:
        dp = self.ctx.need_dp()
        fe = new.frontend
        rev = layout.CgLbRevnat()
        rev.addr[:] = layout.addr16(fe.address)
        rev.port = socket.htons(fe.port)
        rev.family = fe.address.version
        dp.lb_revnat[ctypes.c_uint32(new.rev_nat)] = rev
        before = old.backends if old is not None else ()
        for slot, be in enumerate(new.backends, 1):
            if slot <= len(before) and before[slot - 1] == be:
                continue
            value = layout.CgLbValue()
            value.addr[:] = layout.addr16(be.address)
            value.port = socket.htons(be.port)
            value.rev_nat = new.rev_nat
            dp.lb_services[layout.lb_key(fe.address, fe.port, fe.proto, slot)] = value
        head = layout.CgLbValue()
        head.count = len(new.backends)
        head.rev_nat = new.rev_nat
        head.flags = new.flags
        dp.lb_services[layout.lb_key(fe.address, fe.port, fe.proto, 0)] = head
        for slot in range(len(new.backends) + 1, len(before) + 1):
            dp.lb_services.pop(layout.lb_key(fe.address, fe.port, fe.proto, slot), None)
        if old is not None and old.rev_nat != new.rev_nat:
            dp.lb_revnat.pop(ctypes.c_uint32(old.rev_nat), None)

    def remove(self, obj: LbService) -> None:
        dp = self.ctx.need_dp()
        fe = obj.frontend
        dp.lb_services.pop(layout.lb_key(fe.address, fe.port, fe.proto, 0), None)  # first: lookups miss at once
        for slot in range(1, len(obj.backends) + 1):
            dp.lb_services.pop(layout.lb_key(fe.address, fe.port, fe.proto, slot), None)
        dp.lb_revnat.pop(ctypes.c_uint32(obj.rev_nat), None)


class ServedNamespaces(OnContext):
    """cg_lb_netns: netns cookie -> tag. The cookies of the tags are learned from the map once and
    kept as this handler writes them (a cookie cannot be found from a path that is gone)."""

    kind = ServedNetns.kind

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        self._cookies: dict[int, int] | None = None  # tag -> cookie

    def _index(self) -> dict[int, int]:
        if self._cookies is None:
            self._cookies = {}
            if self.ctx.dp is not None:
                for key, value in list(self.ctx.dp.lb_netns.items()):
                    self._cookies[int(value.value)] = int(key.value)
        return self._cookies

    def observe(self, key: Key) -> ServedNetns | None:
        tag = int(key[1])
        return ServedNetns(tag) if tag in self._index() else None

    def observe_all(self) -> Iterable[ServedNetns]:
        self._cookies = None
        return [ServedNetns(tag) for tag in self._index()]

    def add(self, obj: ServedNetns) -> None:
        dp = self.ctx.need_dp()
        try:
            cookie = netns_cookie(obj.path)
        except Exception as exc:  # not (or no longer) a namespace: the agent adds it once it is one
            if obj.path:
                log.debug("not balancing the sockets of %s yet: %s", obj.path, exc)
                return
            raise
        old = self._index().get(obj.tag)
        dp.lb_netns[ctypes.c_uint64(cookie)] = ctypes.c_uint32(obj.tag)
        self._index()[obj.tag] = cookie
        if old is not None and old != cookie:
            dp.lb_netns.pop(ctypes.c_uint64(old), None)

    def change(self, old: ServedNetns, new: ServedNetns) -> None:
        self.add(new)

    def remove(self, obj: ServedNetns) -> None:
        cookie = self._index().pop(obj.tag, None)
        if cookie is not None:
            self.ctx.need_dp().lb_netns.pop(ctypes.c_uint64(cookie), None)


class VipRoutes(OnContext):
    """The VIP routes, known from one dump and kept as this handler writes them: a route lookup
    cannot see an `unreachable` route (it answers EHOSTUNREACH), and a dump per VIP would cost
    O(services) each. Only this instance writes routes at its metric."""

    kind = VipRoute.kind

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        self.metric = naming.vip_metric(ctx.instance)
        self._known: set[IPAddress] | None = None

    def _dump(self) -> set[IPAddress]:
        found: set[IPAddress] = set()
        for version in (4, 6):
            for m in self.ctx.ipr.get_routes(family=layout.AF[version], table=RT_TABLE_MAIN):
                if (m["proto"] == naming.RTPROT_CELLGATE and m["type"] == RTN_UNREACHABLE
                        and attr(m, "RTA_PRIORITY") == self.metric and m["dst_len"] == (32 if version == 4 else 128)):
                    found.add(ipaddress.ip_address(attr(m, "RTA_DST")))
        return found

    def _index(self) -> set[IPAddress]:
        if self._known is None:
            self._known = self._dump()
        return self._known

    def observe(self, key: Key) -> VipRoute | None:
        address = ipaddress.ip_address(key[1])
        return VipRoute(address, self.metric) if address in self._index() else None

    def observe_all(self) -> Iterable[VipRoute]:
        self._known = self._dump()
        return [VipRoute(a, self.metric) for a in self._known]

    def _route(self, command: str, obj: VipRoute) -> None:
        self.ctx.ipr.route(command, dst=f"{obj.address}/{obj.address.max_prefixlen}", type="unreachable",
                           proto=naming.RTPROT_CELLGATE, priority=obj.metric, table=RT_TABLE_MAIN,
                           family=layout.AF[obj.address.version])

    def add(self, obj: VipRoute) -> None:
        self._route("replace", obj)
        self._index().add(obj.address)

    def change(self, old: VipRoute, new: VipRoute) -> None:
        self.remove(old)
        self.add(new)

    def remove(self, obj: VipRoute) -> None:
        try:
            self._route("del", obj)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise
        self._index().discard(obj.address)


HANDLERS = (LbServices, ServedNamespaces, VipRoutes)


def reset_connections(backends: Sequence[Backend], netns_paths: Sequence[str]) -> int:
    """Abort the TCP sockets connected to `backends` here and in each namespace of `netns_paths`
    (sock_diag SOCK_DESTROY through `ss -K`): their clients see a reset at once instead of
    waiting on a backend that left its service. Returns how many namespaces were asked."""
    if not backends:
        return 0
    terms: list[str] = []
    for be in backends:
        if terms:
            terms.append("or")
        terms += ["(", "dst", str(be.address), "and", "dport", "=", f":{be.port}", ")"]
    asked = 0
    for path in ("", *netns_paths):
        cmd = ["ss", "-K", "-t", "-n", *terms]
        if path:
            if not os.path.exists(path):
                continue
            cmd = ["nsenter", f"--net={path}", *cmd]
        try:
            subprocess.run(cmd, capture_output=True, timeout=10, check=False)
            asked += 1
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("cannot reset connections to %s in %s: %s", ", ".join(map(str, backends)),
                        path or "the host", exc)
    return asked
