"""Handlers of the netlink kinds: host devices, veths, addresses, tc programs, neighbours, routes.

Links are ours by alias tag (or, between the creating request and the tagging one, by group);
routes by our protocol number; neighbours are the permanent ones on our links.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from datapath import failpoints, naming
from datapath.errors import InvalidRequest, KernelError
from datapath.kernel import layout
from datapath.kernel.context import KernelContext, OnContext, Replacing, attr, gone_ok
from datapath.kernel.netns import open_netns, refuse_own
from datapath.plan import HostAddress, HostDevice, IPNetwork, Key, Neighbour, Programs, Route, Veth

log = logging.getLogger(__name__)

TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
NUD_PERMANENT = 0x80
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RT_SCOPE_UNIVERSE = 0
RTM_F_FIB_MATCH = 0x2000
FROM, TO = "cg_from_container", "cg_to_container"
HOST_DEVICE_KINDS = ("dummy", "ifb")


def sysctl(path: str, value: str) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as exc:
        log.debug("sysctl %s=%s: %s", path, value, exc)


class _Link(OnContext):
    """What host devices and veths share: observed by name, tagged after creation, deleted whole."""

    cls: type[HostDevice] | type[Veth]

    def _object(self, link: Any) -> HostDevice | Veth | None:
        ctx = self.ctx
        if not ctx.owned(link):
            return None
        name = str(attr(link, "IFLA_IFNAME"))
        alias = str(attr(link, "IFLA_IFALIAS") or "")  # empty: created, not tagged yet
        kind = ctx.link_kind(link)
        if kind in HOST_DEVICE_KINDS:
            return HostDevice(name, alias)
        if kind == "veth":
            return Veth(name, str(attr(link, "IFLA_ADDRESS")), alias)
        return None

    def observe(self, key: Key) -> HostDevice | Veth | None:
        link = self.ctx.link(key[1])
        return self._object(link) if link is not None else None  # whichever kind the link is

    def observe_all(self) -> Iterable[HostDevice | Veth]:
        for link in self.ctx.owned_links():
            obj = self._object(link)
            if isinstance(obj, self.cls):
                yield obj

    def change(self, old: Any, new: Any) -> None:
        if replace(new, tag="") == old:
            self.add(new)  # made but not tagged when its creator died: finished in place
            return
        self.remove(old)
        self.add(new)

    def add(self, obj: Any) -> None:
        raise NotImplementedError

    @gone_ok
    def remove(self, obj: HostDevice | Veth) -> None:
        link = self.ctx.owned_link(obj.name)
        if link is not None:
            self.ctx.ipr.link("del", index=link["index"])
            self.ctx.forget_link(obj.name)

    def _tag(self, name: str, tag: str) -> None:
        """The second request after a create: alias and up together, so a tagged link is a finished one."""
        link = self.ctx.link(name)
        if link is None:
            raise KernelError(f"link {name} vanished before it was tagged")
        self.ctx.ipr.link("set", index=link["index"], ifalias=tag, state="up")
        self.ctx.forget_link(name)


class _HostDevices(_Link):
    kind = HostDevice.kind
    cls = HostDevice

    def add(self, obj: HostDevice) -> None:
        ctx = self.ctx
        link = ctx.link(obj.name)
        if link is None:
            self._add_blackhole_device(obj.name)
            ctx.forget_link(obj.name)
        elif not ctx.owned(link) or (attr(link, "IFLA_IFALIAS") or "") not in ("", obj.tag):
            raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance {ctx.instance}")
        self._tag(obj.name, obj.tag)

    def _add_blackhole_device(self, name: str) -> None:
        """A device that holds addresses and silently discards what is routed to it.

        dummy is the usual choice; kernels built without it still have ifb, which drops
        every packet that was not redirected to it by tc, so it serves the same purpose.
        """
        for kind in HOST_DEVICE_KINDS:
            try:
                self.ctx.ipr.link("add", ifname=name, kind=kind, group=self.ctx.group)
                return
            except NetlinkError as exc:
                if exc.code != errno.EOPNOTSUPP:
                    raise
        raise KernelError("this kernel supports neither dummy nor ifb links")


class _Veths(_Link):
    kind = Veth.kind
    cls = Veth

    def add(self, obj: Veth) -> None:
        ctx = self.ctx
        link = ctx.link(obj.name)
        if link is not None:
            alias = attr(link, "IFLA_IFALIAS") or ""
            if ctx.owned(link) and alias in ("", obj.tag) and attr(link, "IFLA_ADDRESS") == obj.mac:
                self._finish(obj)  # exists already, or its create was interrupted before the tag
                return
            if ctx.owned(link):
                raise KernelError(f"link {obj.name} exists for another endpoint of cellgate instance {ctx.instance}")
            if not self._leftover(link, obj):
                raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance {ctx.instance}")
            log.warning("replacing %s: an older agent died between creating and tagging it", obj.name)
            ctx.ipr.link("del", index=link["index"])
            ctx.forget_link(obj.name)
        with contextlib.ExitStack() as stack:
            peer: dict[str, Any] = {"ifname": obj.peer, "address": obj.peer_mac}
            if obj.netns:
                fd = self._container_netns(stack, obj.netns)
                if fd is not None:
                    peer = {"ifname": obj.netns_ifname, "address": obj.peer_mac, "net_ns_fd": fd}
            ctx.ipr.link("add", ifname=obj.name, kind="veth", address=obj.mac, group=ctx.group, peer=peer)
        ctx.forget_link(obj.name)
        failpoints.hit("kernel.veth.created")
        self._finish(obj)

    def _finish(self, obj: Veth) -> None:
        sysctl(f"net/ipv6/conf/{obj.name}/accept_ra", "0")  # before it is up; a tagged veth has it
        self._tag(obj.name, obj.tag)

    @staticmethod
    def _leftover(link: Any, obj: Veth) -> bool:
        """Whether `link` is what an agent older than link groups left when it died creating `obj`:
        untagged, in no group, and with the name and MAC derived for this endpoint. The MAC hashes
        the whole endpoint ID, which only cellgate does; any other MAC means someone else's link."""
        return (not attr(link, "IFLA_IFALIAS") and not attr(link, "IFLA_GROUP")
                and KernelContext.link_kind(link) == "veth" and attr(link, "IFLA_ADDRESS") == obj.mac)

    @staticmethod
    def _container_netns(stack: contextlib.ExitStack, path: str) -> int | None:
        """A descriptor of the container namespace the peer should be born in, or None when it
        is gone (or is ours): then the peer waits in the host namespace under its own name,
        as for Docker, whose Join moves it."""
        try:
            fd = stack.enter_context(open_netns(path))
            refuse_own(fd, path)
        except InvalidRequest as exc:
            log.warning("creating the veth peer in the host namespace: %s", exc)
            return None
        return fd


def _links_of(ctx: KernelContext, kinds: tuple[str, ...]) -> Iterable[tuple[int, str]]:
    for link in ctx.owned_links():
        if ctx.link_kind(link) in kinds:
            yield int(link["index"]), str(attr(link, "IFLA_IFNAME"))


class _HostAddresses(OnContext):
    kind = HostAddress.kind

    def observe(self, key: Key) -> HostAddress | None:
        link = self.ctx.owned_link(key[1])
        if link is None:
            return None
        wanted = ipaddress.ip_address(key[2])
        return HostAddress(key[1], wanted) if wanted in self.ctx.addresses(int(link["index"])) else None

    def observe_all(self) -> Iterable[HostAddress]:
        for index, name in _links_of(self.ctx, HOST_DEVICE_KINDS):
            yield from (HostAddress(name, a) for a in self.ctx.addresses(index))

    def add(self, obj: HostAddress) -> None:
        prefix = 32 if obj.address.version == 4 else 128
        self.ctx.ipr.addr("add", index=self.ctx.index(obj.dev), address=str(obj.address), prefixlen=prefix)

    def change(self, old: HostAddress, new: HostAddress) -> None:
        self.remove(old)
        self.add(new)

    @gone_ok
    def remove(self, obj: HostAddress) -> None:
        link = self.ctx.owned_link(obj.dev)
        if link is not None:
            prefix = 32 if obj.address.version == 4 else 128
            self.ctx.ipr.addr("del", index=link["index"], address=str(obj.address), prefixlen=prefix)


class _Programs(Replacing):
    kind = Programs.kind

    def observe(self, key: Key) -> Programs | None:
        link = self.ctx.owned_link(key[1])
        return self._programs(int(link["index"]), key[1]) if link is not None else None

    def observe_all(self) -> Iterable[Programs]:
        for index, name in _links_of(self.ctx, ("veth",)):
            programs = self._programs(index, name)
            if programs is not None:
                yield programs

    def _programs(self, index: int, dev: str) -> Programs | None:
        revisions = []
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            try:
                filters = self.ctx.ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                filters = []
            names = []
            for flt in filters:
                options = attr(flt, "TCA_OPTIONS")
                if options is not None and attr(flt, "TCA_KIND") == "bpf":
                    names.append(str(options.get_attr("TCA_BPF_NAME") or ""))
            mine = [n.split("/", 1)[1] for n in names if n.startswith(program + "/")]
            revisions.append(mine[0] if len(mine) == 1 else None)
        if revisions == [None, None]:
            return None
        if revisions[0] == revisions[1]:
            return Programs(dev, str(revisions[0]))
        return Programs(dev, "mixed")

    def add(self, obj: Programs) -> None:
        dp = self.ctx.need_dp()
        if obj.revision != dp.revision:
            raise KernelError(f"cannot attach programs of revision {obj.revision[:12]}; loaded is {dp.revision[:12]}")
        index = self.ctx.index(obj.dev)
        try:
            self.ctx.ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            self.ctx.ipr.tc(
                "replace-filter", "bpf", index, ":1", fd=dp.programs[program].fd,
                name=dp.filter_name(program), parent=parent, classid=1, direct_action=True, prio=1,
            )

    @gone_ok
    def remove(self, obj: Programs) -> None:
        link = self.ctx.owned_link(obj.dev)
        if link is not None:
            self.ctx.ipr.tc("del", "clsact", link["index"])


class _Neighbours(Replacing):
    kind = Neighbour.kind

    def observe(self, key: Key) -> Neighbour | None:
        link = self.ctx.owned_link(key[1])
        if link is None:
            return None
        index = int(link["index"])
        if ("neigh", index) not in self.ctx.cache:
            self.ctx.cache[("neigh", index)] = self._neighbours(index)
        neighbours: list[Neighbour] = self.ctx.cache[("neigh", index)]
        wanted = ipaddress.ip_address(key[2])
        return next((n for n in neighbours if n.address == wanted), None)

    def observe_all(self) -> Iterable[Neighbour]:
        for index, _name in _links_of(self.ctx, ("veth",)):
            yield from self._neighbours(index)

    def _neighbours(self, index: int) -> list[Neighbour]:
        dev = self.ctx.ifname(index) or f"@{index}"
        out = []
        for neigh in self.ctx.ipr.get_neighbours(ifindex=index):
            if not neigh["state"] & NUD_PERMANENT or attr(neigh, "NDA_LLADDR") is None:
                continue
            out.append(Neighbour(dev, ipaddress.ip_address(attr(neigh, "NDA_DST")), str(attr(neigh, "NDA_LLADDR"))))
        return out

    def add(self, obj: Neighbour) -> None:
        self.ctx.ipr.neigh(
            "replace", dst=str(obj.address), lladdr=obj.mac, ifindex=self.ctx.index(obj.dev),
            state=NUD_PERMANENT, family=layout.AF[obj.address.version],
        )

    @gone_ok
    def remove(self, obj: Neighbour) -> None:
        link = self.ctx.owned_link(obj.dev)
        if link is not None:
            self.ctx.ipr.neigh("del", dst=str(obj.address), ifindex=link["index"],
                               family=layout.AF[obj.address.version])


class _Routes(OnContext):
    kind = Route.kind

    def observe(self, key: Key) -> Route | None:
        """Our route for exactly `dst`, found with a FIB-match lookup instead of a table dump."""
        dst = ipaddress.ip_network(key[1])
        try:
            msgs = self.ctx.ipr.route("get", dst=str(dst.network_address), flags=RTM_F_FIB_MATCH,
                                      family=layout.AF[dst.version])
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT, errno.ESRCH):
                return None
            raise
        for msg in msgs:
            if msg["proto"] != naming.RTPROT_CELLGATE or msg["dst_len"] != dst.prefixlen:
                continue
            if ipaddress.ip_address(attr(msg, "RTA_DST") or "0.0.0.0") != dst.network_address:
                continue
            gateway = attr(msg, "RTA_GATEWAY")
            if gateway:  # native routing: through a peer node, over a device that is not ours
                src = attr(msg, "RTA_PREFSRC")
                return Route(dst, "", ipaddress.ip_address(src) if src else None, ipaddress.ip_address(gateway))
            dev = self.ctx.ifname(attr(msg, "RTA_OIF") or 0)
            if not dev or self.ctx.owned_link(dev) is None:
                return None  # another instance's route
            src = attr(msg, "RTA_PREFSRC")
            return Route(dst, dev, ipaddress.ip_address(src) if src else None)
        return None

    def observe_all(self) -> Iterable[Route]:
        names = set(self.ctx.owned_names().values())
        for version in (4, 6):
            yield from (r for r in self.routes(version) if r.dev in names or r.via is not None)

    def routes(self, version: int) -> list[Route]:
        out = []
        for msg in self.ctx.ipr.get_routes(family=layout.AF[version], table=RT_TABLE_MAIN):
            if msg["proto"] != naming.RTPROT_CELLGATE:
                continue
            dst = ipaddress.ip_network(f"{attr(msg, 'RTA_DST')}/{msg['dst_len']}")
            oif = attr(msg, "RTA_OIF")
            dev = (self.ctx.ifname(oif) if oif else None) or f"@{oif}"
            src = attr(msg, "RTA_PREFSRC")
            gateway = attr(msg, "RTA_GATEWAY")
            if gateway:
                out.append(Route(dst, "", ipaddress.ip_address(src) if src else None, ipaddress.ip_address(gateway)))
                continue
            out.append(Route(dst, dev, ipaddress.ip_address(src) if src else None))
        return out

    def add(self, obj: Route) -> None:
        self._route("replace", obj)

    def change(self, old: Route, new: Route) -> None:
        if old.dev != new.dev or (old.via is None) != (new.via is None):
            self.remove(old)
        self.add(new)  # route replace: no gap

    @gone_ok
    def remove(self, obj: Route) -> None:
        if obj.via is not None:
            self._route("del", obj)
            return
        link = self.ctx.owned_link(obj.dev)
        if link is not None:  # a route to a vanished link went with it
            self._route("del", obj, int(link["index"]))

    def _route(self, command: str, obj: Route, oif: int | None = None) -> None:
        args: dict[str, Any] = {
            "dst": str(obj.dst),
            "proto": naming.RTPROT_CELLGATE,
            "scope": RT_SCOPE_LINK,
            "table": RT_TABLE_MAIN,
            "family": layout.AF[obj.dst.version],
        }
        if obj.via is not None:  # a gateway route: the kernel picks the device that reaches it
            sysctl("net/ipv4/ip_forward", "1")  # native routing forwards endpoint traffic to peers
            args["scope"] = RT_SCOPE_UNIVERSE
            args["gateway"] = str(obj.via)
            if obj.src is not None and command != "del":
                args["prefsrc"] = str(obj.src)
            self.ctx.ipr.route(command, **args)
            return
        if command == "del":
            if oif is not None:
                args["oif"] = oif  # only the route through our link, never another instance's
            self.ctx.ipr.route("del", **args)
            return
        args["oif"] = self.ctx.index(obj.dev)
        if obj.src is not None:
            args["prefsrc"] = str(obj.src)
        self.ctx.ipr.route(command, **args)


def host_routes(ctx: KernelContext) -> list[IPNetwork]:
    """Destinations the host routes that are not ours."""
    out: list[IPNetwork] = []
    for version in (4, 6):
        for msg in ctx.ipr.get_routes(family=layout.AF[version], table=RT_TABLE_MAIN):
            dst = attr(msg, "RTA_DST")
            if dst and msg["dst_len"] > 0 and msg["proto"] != naming.RTPROT_CELLGATE:
                out.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    return out


HANDLERS = (_HostDevices, _Veths, _HostAddresses, _Programs, _Neighbours, _Routes)
