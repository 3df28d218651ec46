"""Handler of the netdev-program kind: cg_from_netdev on the ingress of the node's own devices
(packet-level balancing, direct server return). The device is not ours, only our filter is:
it carries the instance's own priority (naming.netdev_prio) and the program's name/revision.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

from pyroute2.netlink.exceptions import NetlinkError

from datapath import naming
from datapath.errors import KernelError
from datapath.kernel.context import KernelContext, OnContext, attr
from datapath.kernel.links import TC_INGRESS
from datapath.plan import Key, NetdevProgram

log = logging.getLogger(__name__)
PROGRAM = "cg_from_netdev"


class NetdevPrograms(OnContext):
    kind = NetdevProgram.kind

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        self.prio = naming.netdev_prio(ctx.instance)

    def _revision(self, index: int) -> str | None:
        try:
            filters = self.ctx.ipr.get_filters(index=index, parent=TC_INGRESS)
        except NetlinkError:
            return None
        for flt in filters:
            options = attr(flt, "TCA_OPTIONS")
            if options is None or attr(flt, "TCA_KIND") != "bpf" or (flt["info"] >> 16) != self.prio:
                continue
            name = str(options.get_attr("TCA_BPF_NAME") or "")
            if name.startswith(PROGRAM + "/"):
                return name.split("/", 1)[1]
        return None

    def observe(self, key: Key) -> NetdevProgram | None:
        link = self.ctx.link(key[1])
        if link is None:
            return None
        revision = self._revision(int(link["index"]))
        return NetdevProgram(key[1], revision) if revision is not None else None

    def observe_all(self) -> Iterable[NetdevProgram]:
        out = []
        for link in self.ctx.ipr.get_links():
            name = str(attr(link, "IFLA_IFNAME"))
            revision = self._revision(int(link["index"]))
            if revision is not None:
                out.append(NetdevProgram(name, revision))
        return out

    def add(self, obj: NetdevProgram) -> None:
        dp = self.ctx.need_dp()
        if obj.revision != dp.revision:
            raise KernelError(f"{PROGRAM} of revision {obj.revision} asked, {dp.revision} loaded")
        link = self.ctx.link(obj.dev)
        if link is None:
            raise KernelError(f"--lb-devices: no device {obj.dev}")
        index = int(link["index"])
        try:
            self.ctx.ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        self.ctx.ipr.tc("replace-filter", "bpf", index, ":1", fd=dp.programs[PROGRAM].fd,
                        name=dp.filter_name(PROGRAM), parent=TC_INGRESS, classid=1, direct_action=True,
                        prio=self.prio)
        log.info("packet-level balancing on %s", obj.dev)

    def change(self, old: NetdevProgram, new: NetdevProgram) -> None:
        self.add(new)  # filter replace: no gap

    def remove(self, obj: NetdevProgram) -> None:
        link = self.ctx.link(obj.dev)
        if link is None:
            return
        try:
            self.ctx.ipr.tc("del-filter", "bpf", int(link["index"]), ":1", parent=TC_INGRESS, prio=self.prio)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise


HANDLERS = (NetdevPrograms,)
