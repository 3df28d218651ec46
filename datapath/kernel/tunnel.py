"""Handler of the tunnel kind: the instance's collect-metadata VXLAN device with cg_overlay on it.

The device is ours by alias tag (or group, between create and tag), like every link. Adding it
also attaches cg_from_overlay / cg_to_overlay from the loaded datapath and writes its ifindex
into cg_config, which turns encapsulation on in cg_lxc; removing it turns that off again.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from datapath.errors import KernelError
from datapath.kernel.context import KernelContext, OnContext, attr, gone_ok
from datapath.kernel.links import TC_EGRESS, TC_INGRESS, sysctl
from datapath.kernel.maps import Config
from datapath.plan import Key, TunnelDevice

log = logging.getLogger(__name__)

FROM, TO = "cg_from_overlay", "cg_to_overlay"
IFF_NOARP = 0x80
STALE = "stale:"  # tag prefix of a device whose programs or config entry are not this datapath's


class TunnelDevices(OnContext):
    kind = TunnelDevice.kind

    def __init__(self, ctx: KernelContext, config: Config) -> None:
        super().__init__(ctx)
        self.config = config

    # -- observe ----------------------------------------------------------------------------

    def observe(self, key: Key) -> TunnelDevice | None:
        link = self.ctx.owned_link(key[1])
        return self._object(link) if link is not None else None

    def observe_all(self) -> Iterable[TunnelDevice]:
        for link in self.ctx.owned_links():
            obj = self._object(link)
            if obj is not None:
                yield obj

    def _object(self, link: Any) -> TunnelDevice | None:
        if self.ctx.link_kind(link) != "vxlan":
            return None
        name = str(attr(link, "IFLA_IFNAME"))
        tag = str(attr(link, "IFLA_IFALIAS") or "")
        port = int(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_PORT") or 0)
        if not self._current(int(link["index"])):
            tag = STALE + tag  # differs from the desired object: the plan re-adds it in place
        return TunnelDevice(name, tag, port)

    def _current(self, index: int) -> bool:
        """Whether this datapath's programs run on the device and cg_config points at it."""
        dp = self.ctx.dp
        if dp is None:
            return False
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            try:
                filters = self.ctx.ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                return False
            names = set()
            for flt in filters:
                options = attr(flt, "TCA_OPTIONS")
                if options is not None and attr(flt, "TCA_KIND") == "bpf":
                    names.add(str(options.get_attr("TCA_BPF_NAME") or ""))
            if dp.filter_name(program) not in names:
                return False
        return self.config.tunnel_ifindex() == index

    # -- apply ------------------------------------------------------------------------------

    def add(self, obj: TunnelDevice) -> None:
        ctx = self.ctx
        dp = ctx.need_dp()
        link = ctx.link(obj.name)
        if link is not None:
            if not ctx.owned(link) or ctx.link_kind(link) != "vxlan":
                raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance {ctx.instance}")
            have = self._object(link)
            if have is not None and have.port != obj.port:
                self._delete(int(link["index"]), obj.name)
                link = None
        if link is None:
            ctx.ipr.link("add", ifname=obj.name, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=obj.port,
                         vxlan_learning=0, group=ctx.group)
            ctx.forget_link(obj.name)
        index = ctx.index(obj.name)
        sysctl("net/ipv4/ip_forward", "1")  # replies of endpoints to peer nodes' hosts go through the stack
        sysctl(f"net/ipv6/conf/{obj.name}/addr_gen_mode", "1")  # no link-local: no MLD, RS, DAD
        sysctl(f"net/ipv6/conf/{obj.name}/accept_ra", "0")
        # No ARP or ND on it: the host routes remote ranges here and cg_to_overlay picks the node.
        ctx.ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
        ctx.ipr.link("set", index=index, ifalias=obj.tag, state="up")
        ctx.forget_link(obj.name)
        try:
            ctx.ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            ctx.ipr.tc("replace-filter", "bpf", index, ":1", fd=dp.programs[program].fd,
                       name=dp.filter_name(program), parent=parent, classid=1, direct_action=True, prio=1)
        self.config.set_tunnel(index)
        log.info("tunnel device %s (vxlan, port %d) ready", obj.name, obj.port)

    def change(self, old: TunnelDevice, new: TunnelDevice) -> None:
        self.add(new)  # in place: the device, its programs and the config entry, made current

    @gone_ok
    def remove(self, obj: TunnelDevice) -> None:
        link = self.ctx.owned_link(obj.name)
        if link is not None and self.ctx.link_kind(link) == "vxlan":
            self._delete(int(link["index"]), obj.name)

    def _delete(self, index: int, name: str) -> None:
        if self.ctx.dp is not None and self.config.tunnel_ifindex() == index:
            self.config.set_tunnel(0)  # first: encapsulation stops before its device goes
        self.ctx.ipr.link("del", index=index)
        self.ctx.forget_link(name)
