"""The real Kernel port: observes and applies plan objects with pyroute2, BCC maps and iptables.

Only objects that carry our marks are ever observed, changed or removed: links whose
alias starts with this instance's tag, routes with our protocol number, permanent
neighbours on our links, entries in our pinned maps and rules in our iptables chains.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from datapath import failpoints, naming
from datapath.errors import InvalidRequest, KernelError
from datapath.kernel import layout
from datapath.kernel.loader import Datapath
from datapath.kernel.netns import open_netns, refuse_own
from datapath.plan import (
    AddressEntry,
    EndpointEntry,
    HostAddress,
    HostDevice,
    IpcacheEntry,
    IPNetwork,
    KernelObject,
    Key,
    Masquerade,
    Neighbour,
    Plan,
    Programs,
    Route,
    Veth,
)
from datapath.policymap import PolicyKey, PolicyValue

log = logging.getLogger(__name__)

TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
NUD_PERMANENT = 0x80
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
FROM, TO = "cg_from_container", "cg_to_container"
HOST_DEVICE_KINDS = ("dummy", "ifb")
BATCH = 4096
RTM_F_FIB_MATCH = 0x2000
CFG_TRACE, CFG_QUIET = 0x1, 0x2  # struct cg_config flags (bpf/lib/common.h)
_MISSING = object()


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class KernelExecutor:
    """Kernel port for one agent instance."""

    def __init__(self, instance: str, datapath: Datapath | None) -> None:
        self.instance = instance
        self.tag = naming.link_tag(instance)
        self.group = naming.link_group(instance)
        self.dp = datapath
        self.ipr = IPRoute()
        self.iptables = Iptables(instance)
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], Any] = {}  # lookups shared within one observe()
        self._caching = False
        self._config_lock = threading.Lock()
        self._config: layout.CgConfig | None = None  # what cg_config holds, once we wrote it

    def close(self) -> None:
        self.ipr.close()

    # -- helpers ----------------------------------------------------------------------------

    def _link(self, name: str) -> Any | None:
        cached = self._cache.get(("link", name), _MISSING) if self._caching else _MISSING
        if cached is not _MISSING:
            return cached
        try:
            link = self.ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise
            link = None
        if self._caching:
            self._cache[("link", name)] = link
        return link

    def _owned(self, link: Any) -> bool:
        alias = _attr(link, "IFLA_IFALIAS") or ""
        if alias:
            return bool(alias.startswith(self.tag))
        # Not tagged yet: the kernel ignores an alias in the request that creates a link, so we
        # tag in a second one. The group, set in the first, marks what we made if we died between.
        name = str(_attr(link, "IFLA_IFNAME"))
        return _attr(link, "IFLA_GROUP") == self.group and name.startswith(naming.HOST_PREFIX)

    def _index(self, name: str) -> int:
        if name.startswith("@"):
            return int(name[1:])
        link = self._link(name)
        if link is None or not self._owned(link):
            raise KernelError(f"link {name} is missing or not owned by cellgate instance {self.instance}")
        return int(link["index"])

    def ifname(self, ifindex: int) -> str | None:
        try:
            return socket.if_indextoname(ifindex)
        except OSError:
            return None

    def _need_dp(self) -> Datapath:
        if self.dp is None:
            raise KernelError("the datapath is not loaded")
        return self.dp

    # -- observe ----------------------------------------------------------------------------

    def observe(self, keys: Iterable[Key] | None = None) -> set[KernelObject]:
        with self._lock:
            self._cache, self._caching = {}, True
            try:
                if keys is None:
                    return self._observe_all()
                found: set[KernelObject] = set()
                for key in set(keys):
                    obj = self._observe_key(key)
                    if obj is not None:
                        found.add(obj)
                return found
            except NetlinkError as exc:
                raise KernelError(f"netlink: {exc}") from exc
            finally:
                self._cache, self._caching = {}, False

    def _observe_key(self, key: Key) -> KernelObject | None:
        kind = key[0]
        if kind in ("device", "veth"):
            link = self._link(key[1])
            return self._link_object(link) if link is not None else None
        if kind == "address":
            link = self._link(key[1])
            if link is None or not self._owned(link):
                return None
            wanted = ipaddress.ip_address(key[2])
            return HostAddress(key[1], wanted) if wanted in self._addresses(int(link["index"])) else None
        if kind == "endpoint-entry":
            link = self._link(key[1])
            if link is None or self.dp is None:
                return None
            return self._endpoint_entry(int(link["index"]), key[1])
        if kind == "address-entry":
            return self._address_entry(ipaddress.ip_address(key[1]))
        if kind == "programs":
            link = self._link(key[1])
            if link is None or not self._owned(link):
                return None
            return self._programs(int(link["index"]), key[1])
        if kind == "neighbour":
            link = self._link(key[1])
            if link is None or not self._owned(link):
                return None
            index = int(link["index"])
            if ("neigh", index) not in self._cache:
                self._cache[("neigh", index)] = self._neighbours(index)
            for neigh in self._cache[("neigh", index)]:
                if neigh.address == ipaddress.ip_address(key[2]):
                    return neigh
            return None
        if kind == "route":
            return self._route_for(ipaddress.ip_network(key[1]))
        if kind == "masquerade":
            subnet = ipaddress.IPv4Network(key[1])
            return Masquerade(subnet) if subnet in self.iptables.subnets() else None
        if kind == "ipcache":
            if self.dp is None:
                return None
            prefix = ipaddress.ip_network(key[1])
            try:
                value = layout.CgIpcacheValue.from_buffer_copy(bytes(self.dp.ipcache[layout.ipcache_key(prefix)]))
            except KeyError:
                return None
            return IpcacheEntry(prefix, value.identity)
        raise KernelError(f"unknown kernel object kind {kind!r}")

    def _observe_all(self) -> set[KernelObject]:
        found: set[KernelObject] = set()
        names: dict[int, str] = {}
        for link in self.ipr.get_links():
            if not self._owned(link):
                continue
            name = str(_attr(link, "IFLA_IFNAME"))
            names[int(link["index"])] = name
            obj = self._link_object(link)
            if obj is not None:
                found.add(obj)
            index = int(link["index"])
            if isinstance(obj, HostDevice):
                found.update(HostAddress(name, a) for a in self._addresses(index))
            if isinstance(obj, Veth):
                programs = self._programs(index, name)
                if programs is not None:
                    found.add(programs)
                found.update(self._neighbours(index))
        for version in (4, 6):
            found.update(r for r in self._routes(version) if r.dev in names.values())
        if self.dp is not None:
            for key, _leaf in list(self.dp.endpoints.items()):
                index = int(key.value)
                entry = self._endpoint_entry(index, names.get(index, f"@{index}"))
                if entry is not None:
                    found.add(entry)
            for key in list(self.dp.ips.keys()):
                entry = self._address_entry(layout.key_address(layout.CgIpKey.from_buffer_copy(bytes(key))), names)
                if entry is not None:
                    found.add(entry)
            for key, value in list(self.dp.ipcache.items()):
                prefix = layout.ipcache_prefix(layout.CgIpcacheKey.from_buffer_copy(bytes(key)))
                found.add(IpcacheEntry(prefix, layout.CgIpcacheValue.from_buffer_copy(bytes(value)).identity))
        found.update(Masquerade(s) for s in self.iptables.subnets())
        return found

    def _link_object(self, link: Any) -> KernelObject | None:
        if not self._owned(link):
            return None
        name = str(_attr(link, "IFLA_IFNAME"))
        alias = str(_attr(link, "IFLA_IFALIAS") or "")  # empty: created, not tagged yet
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind in HOST_DEVICE_KINDS:
            return HostDevice(name, alias)
        if kind == "veth":
            return Veth(name, str(_attr(link, "IFLA_ADDRESS")), alias)
        return None

    def _addresses(self, index: int) -> list[Any]:
        """Addresses we put on a device (the kernel's own link-local ones are not ours)."""
        found = (ipaddress.ip_address(_attr(a, "IFA_ADDRESS")) for a in self.ipr.get_addr(index=index))
        return [a for a in found if not a.is_link_local]

    def _endpoint_entry(self, index: int, dev: str) -> EndpointEntry | None:
        dp = self._need_dp()
        try:
            leaf = dp.endpoints[ctypes.c_uint32(index)]
        except KeyError:
            return None
        raw = layout.CgEndpoint.from_buffer_copy(bytes(leaf))
        return EndpointEntry(dev, layout.endpoint_value(raw))

    def _address_entry(self, address: Any, names: dict[int, str] | None = None) -> AddressEntry | None:
        dp = self._need_dp()
        try:
            leaf = dp.ips[layout.ip_key(address)]
        except KeyError:
            return None
        raw = layout.CgEndpoint.from_buffer_copy(bytes(leaf))
        dev = (names or {}).get(raw.ifindex) or self.ifname(raw.ifindex) or f"@{raw.ifindex}"
        return AddressEntry(address, dev, layout.endpoint_value(raw))

    def _programs(self, index: int, dev: str) -> Programs | None:
        revisions = []
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            try:
                filters = self.ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                filters = []
            names = []
            for flt in filters:
                options = _attr(flt, "TCA_OPTIONS")
                if options is not None and _attr(flt, "TCA_KIND") == "bpf":
                    names.append(str(options.get_attr("TCA_BPF_NAME") or ""))
            mine = [n.split("/", 1)[1] for n in names if n.startswith(program + "/")]
            revisions.append(mine[0] if len(mine) == 1 else None)
        if revisions == [None, None]:
            return None
        if revisions[0] == revisions[1]:
            return Programs(dev, str(revisions[0]))
        return Programs(dev, "mixed")

    def _neighbours(self, index: int) -> list[Neighbour]:
        dev = self.ifname(index) or f"@{index}"
        out = []
        for neigh in self.ipr.get_neighbours(ifindex=index):
            if not neigh["state"] & NUD_PERMANENT or _attr(neigh, "NDA_LLADDR") is None:
                continue
            out.append(Neighbour(dev, ipaddress.ip_address(_attr(neigh, "NDA_DST")), str(_attr(neigh, "NDA_LLADDR"))))
        return out

    def _route_for(self, dst: IPNetwork) -> Route | None:
        """Our route for exactly `dst`, found with a FIB-match lookup instead of a table dump."""
        try:
            msgs = self.ipr.route("get", dst=str(dst.network_address), flags=RTM_F_FIB_MATCH,
                                  family=layout.AF[dst.version])
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT, errno.ESRCH):
                return None
            raise
        for msg in msgs:
            if msg["proto"] != naming.RTPROT_CELLGATE or msg["dst_len"] != dst.prefixlen:
                continue
            if ipaddress.ip_address(_attr(msg, "RTA_DST") or "0.0.0.0") != dst.network_address:
                continue
            dev = self.ifname(_attr(msg, "RTA_OIF") or 0)
            link = self._link(dev) if dev else None
            if link is None or not self._owned(link):
                return None  # another instance's route
            src = _attr(msg, "RTA_PREFSRC")
            return Route(dst, dev, ipaddress.ip_address(src) if src else None)
        return None

    def _routes(self, version: int) -> list[Route]:
        out = []
        for msg in self.ipr.get_routes(family=layout.AF[version], table=RT_TABLE_MAIN):
            if msg["proto"] != naming.RTPROT_CELLGATE:
                continue
            dst = ipaddress.ip_network(f"{_attr(msg, 'RTA_DST')}/{msg['dst_len']}")
            oif = _attr(msg, "RTA_OIF")
            dev = (self.ifname(oif) if oif else None) or f"@{oif}"
            src = _attr(msg, "RTA_PREFSRC")
            out.append(Route(dst, dev, ipaddress.ip_address(src) if src else None))
        return out

    def host_routes(self) -> list[IPNetwork]:
        out: list[IPNetwork] = []
        with self._lock:
            for version in (4, 6):
                for msg in self.ipr.get_routes(family=layout.AF[version], table=RT_TABLE_MAIN):
                    dst = _attr(msg, "RTA_DST")
                    if dst and msg["dst_len"] > 0 and msg["proto"] != naming.RTPROT_CELLGATE:
                        out.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
        return out

    def counters(self) -> dict[int, tuple[int, int]]:
        return self.dp.counters() if self.dp is not None else {}

    def host_addresses(self) -> list[Any]:
        """Every address configured in the host's network namespace."""
        with self._lock:
            found = {ipaddress.ip_address(_attr(a, "IFA_ADDRESS")) for a in self.ipr.get_addr()}
        return sorted((a for a in found if not a.is_link_local), key=lambda a: (a.version, int(a)))

    # -- policy map -------------------------------------------------------------------------

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        dp = self._need_dp()
        out: dict[PolicyKey, PolicyValue] = {}
        for key, value in dp.policy.items():
            raw_key = layout.CgPolicyKey.from_buffer_copy(bytes(key))
            out[layout.policy_key_value(raw_key)] = layout.policy_value_value(
                layout.CgPolicyValue.from_buffer_copy(bytes(value)))
        return out

    def policy_update(self, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        """Write and remove policy entries, in batches; upserts first, so nothing opens up."""
        dp = self._need_dp()
        items = list(upserts.items())
        gone = list(deletes)
        try:
            for start in range(0, len(items), BATCH):
                chunk = items[start:start + BATCH]
                dp.policy.items_update_batch(layout.policy_keys([k for k, _ in chunk]),
                                             layout.policy_values([v for _, v in chunk]))
            for start in range(0, len(gone), BATCH):
                doomed = gone[start:start + BATCH]
                try:  # all-or-nothing per key: a key that is already gone fails the batch
                    dp.policy.items_delete_batch(layout.policy_keys(doomed))
                except Exception:  # BCC raises bare Exception; one by one instead
                    for key in doomed:
                        dp.policy.pop(layout.policy_key(key), None)
        except Exception as exc:  # BCC raises bare Exception on syscall errors
            raise KernelError(f"policy map update failed: {exc}") from exc
        finally:
            if items or gone:
                self._write_config(bump=True)  # after the writes: cached verdicts decide again

    # -- conntrack and config ---------------------------------------------------------------

    def ct_entries(self) -> list[tuple[layout.CgCtKey, layout.CgCtValue]]:
        dp = self._need_dp()
        return [(layout.CgCtKey.from_buffer_copy(bytes(k)), layout.CgCtValue.from_buffer_copy(bytes(v)))
                for k, v in dp.ct.items()]

    def ct_gc(self, now_ns: int) -> int:
        """Delete expired conntrack entries; returns how many."""
        dp = self._need_dp()
        expired = [k for k, v in dp.ct.items() if v.expires <= now_ns]
        for key in expired:
            dp.ct.pop(key, None)
        return len(expired)

    def ct_flush(self, match: Callable[[layout.CgCtValue], bool]) -> int:
        dp = self._need_dp()
        doomed = [k for k, v in dp.ct.items() if match(layout.CgCtValue.from_buffer_copy(bytes(v)))]
        for key in doomed:
            dp.ct.pop(key, None)
        return len(doomed)

    def set_config(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        cfg = layout.CgConfig()
        cfg.flags = (CFG_TRACE if trace else 0) | (0 if verdicts else CFG_QUIET)
        for name, seconds in timeouts.items():
            setattr(cfg, f"{name}_timeout_ns", int(seconds * 1e9))
        self._write_config(cfg)

    def policy_revision(self) -> int:
        with self._config_lock:
            return int(self._current_config().policy_rev)

    def _current_config(self) -> layout.CgConfig:
        if self._config is None:
            try:
                raw = self._need_dp().config[ctypes.c_uint32(0)]
            except KeyError:
                return layout.CgConfig()
            return layout.CgConfig.from_buffer_copy(bytes(raw))
        return self._config

    def _write_config(self, cfg: layout.CgConfig | None = None, bump: bool = False) -> None:
        """Write cg_config, keeping the policy revision, which moves forward (never to 0) when
        the policy map changed, and on this executor's first write: a predecessor may have died
        between changing the map and bumping it, so verdicts cached before are all decided again."""
        dp = self._need_dp()
        with self._config_lock:
            current = self._current_config()
            new = layout.CgConfig.from_buffer_copy(bytes(cfg if cfg is not None else current))
            new.policy_rev = current.policy_rev
            if bump or self._config is None:
                new.policy_rev = current.policy_rev % 0xFFFFFFFF + 1
            dp.config[ctypes.c_uint32(0)] = new
            self._config = new

    # -- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        with self._lock:
            self._cache, self._caching = {}, True
            try:
                for obj in plan.remove:
                    self._run(self._remove, obj)
                for old, new in plan.change:
                    self._run(self._change, old, new)
                for obj in plan.add:
                    self._run(self._add, obj)
            finally:
                self._cache, self._caching = {}, False

    def _forget_link(self, name: str) -> None:
        self._cache.pop(("link", name), None)

    def _run(self, fn: Any, *objs: KernelObject) -> None:
        try:
            fn(*objs)
        except KernelError:
            raise
        except NetlinkError as exc:
            raise KernelError(f"{fn.__name__.strip('_')} {objs[-1]}: {exc}") from exc
        except (OSError, KeyError, ValueError, subprocess.CalledProcessError) as exc:
            raise KernelError(f"{fn.__name__.strip('_')} {objs[-1]}: {exc}") from exc

    def _add(self, obj: KernelObject) -> None:
        log.debug("add %s", obj)
        if isinstance(obj, HostDevice):
            link = self._link(obj.name)
            if link is None:
                self._add_blackhole_device(obj.name)
                self._forget_link(obj.name)
            elif not self._owned(link) or (_attr(link, "IFLA_IFALIAS") or "") not in ("", obj.tag):
                raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance {self.instance}")
            self._tag(obj.name, obj.tag)
        elif isinstance(obj, Veth):
            self._add_veth(obj)
        elif isinstance(obj, HostAddress):
            prefix = 32 if obj.address.version == 4 else 128
            self.ipr.addr("add", index=self._index(obj.dev), address=str(obj.address), prefixlen=prefix)
        elif isinstance(obj, EndpointEntry):
            dp = self._need_dp()
            index = self._index(obj.dev)
            dp.endpoints[ctypes.c_uint32(index)] = layout.endpoint_struct(obj.value, index)
        elif isinstance(obj, AddressEntry):
            dp = self._need_dp()
            index = self._index(obj.dev)
            dp.ips[layout.ip_key(obj.address)] = layout.endpoint_struct(obj.value, index)
        elif isinstance(obj, Programs):
            self._attach(obj)
        elif isinstance(obj, Neighbour):
            self.ipr.neigh(
                "replace", dst=str(obj.address), lladdr=obj.mac, ifindex=self._index(obj.dev),
                state=NUD_PERMANENT, family=layout.AF[obj.address.version],
            )
        elif isinstance(obj, Route):
            self._route("replace", obj)
        elif isinstance(obj, Masquerade):
            self.iptables.add(obj.subnet)
        elif isinstance(obj, IpcacheEntry):
            value = layout.CgIpcacheValue()
            value.identity = obj.identity
            self._need_dp().ipcache[layout.ipcache_key(obj.prefix)] = value
        else:
            raise KernelError(f"cannot add {obj!r}")

    def _change(self, old: KernelObject, new: KernelObject) -> None:
        log.debug("change %s -> %s", old, new)
        if isinstance(new, (Veth, HostDevice)) and replace(new, tag="") == old:
            self._add(new)  # made but not tagged when its creator died: finished in place
            return
        if isinstance(new, (EndpointEntry, AddressEntry, Programs, Neighbour, Route, IpcacheEntry)):
            if isinstance(new, Route) and isinstance(old, Route) and old.dev != new.dev:
                self._remove(old)
            self._add(new)  # map update, filter replace, neighbour/route replace: no gap
            return
        self._remove(old)
        self._add(new)

    def _remove(self, obj: KernelObject) -> None:
        log.debug("remove %s", obj)
        try:
            if isinstance(obj, (HostDevice, Veth)):
                link = self._link(obj.name)
                if link is not None and self._owned(link):
                    self.ipr.link("del", index=link["index"])
                    self._forget_link(obj.name)
            elif isinstance(obj, HostAddress):
                link = self._link(obj.dev)
                if link is not None and self._owned(link):
                    prefix = 32 if obj.address.version == 4 else 128
                    self.ipr.addr("del", index=link["index"], address=str(obj.address), prefixlen=prefix)
            elif isinstance(obj, EndpointEntry):
                dp = self._need_dp()
                index = int(obj.dev[1:]) if obj.dev.startswith("@") else None
                if index is None:
                    link = self._link(obj.dev)
                    index = int(link["index"]) if link is not None else None
                if index is not None:
                    dp.endpoints.pop(ctypes.c_uint32(index), None)
            elif isinstance(obj, AddressEntry):
                dp = self._need_dp()
                key = layout.ip_key(obj.address)
                try:
                    index = layout.CgEndpoint.from_buffer_copy(bytes(dp.ips[key])).ifindex
                except KeyError:
                    return
                dp.ips.pop(key, None)
                if self.ifname(index) is None:
                    # The link vanished behind our back (its netns was destroyed), so the endpoint
                    # entry can no longer be found by name; it is keyed by the dead ifindex.
                    dp.endpoints.pop(ctypes.c_uint32(index), None)
            elif isinstance(obj, Programs):
                link = self._link(obj.dev)
                if link is not None and self._owned(link):
                    self.ipr.tc("del", "clsact", link["index"])
            elif isinstance(obj, Neighbour):
                link = self._link(obj.dev)
                if link is not None and self._owned(link):
                    self.ipr.neigh("del", dst=str(obj.address), ifindex=link["index"],
                                   family=layout.AF[obj.address.version])
            elif isinstance(obj, Route):
                link = self._link(obj.dev)
                if link is not None and self._owned(link):  # a route to a vanished link went with it
                    self._route("del", obj, int(link["index"]))
            elif isinstance(obj, Masquerade):
                self.iptables.remove(obj.subnet)
            elif isinstance(obj, IpcacheEntry):
                self._need_dp().ipcache.pop(layout.ipcache_key(obj.prefix), None)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.EINVAL):
                raise

    def _add_veth(self, obj: Veth) -> None:
        link = self._link(obj.name)
        if link is not None:
            alias = _attr(link, "IFLA_IFALIAS") or ""
            if self._owned(link) and alias in ("", obj.tag) and _attr(link, "IFLA_ADDRESS") == obj.mac:
                self._finish_veth(obj)  # exists already, or its create was interrupted before the tag
                return
            if self._owned(link):
                raise KernelError(f"link {obj.name} exists for another endpoint of cellgate instance {self.instance}")
            if not self._leftover(link, obj):
                raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance {self.instance}")
            log.warning("replacing %s: an older agent died between creating and tagging it", obj.name)
            self.ipr.link("del", index=link["index"])
            self._forget_link(obj.name)
        with contextlib.ExitStack() as stack:
            peer = {"ifname": obj.peer, "address": obj.peer_mac}
            if obj.netns:
                fd = self._container_netns(stack, obj.netns)
                if fd is not None:
                    peer = {"ifname": obj.netns_ifname, "address": obj.peer_mac, "net_ns_fd": fd}
            self.ipr.link("add", ifname=obj.name, kind="veth", address=obj.mac, group=self.group, peer=peer)
        self._forget_link(obj.name)
        failpoints.hit("kernel.veth.created")
        self._finish_veth(obj)

    def _finish_veth(self, obj: Veth) -> None:
        _sysctl(f"net/ipv6/conf/{obj.name}/accept_ra", "0")  # before it is up; a tagged veth has it
        self._tag(obj.name, obj.tag)

    def _tag(self, name: str, tag: str) -> None:
        """The second request after a create: alias and up together, so a tagged link is a finished one."""
        self.ipr.link("set", index=self._link(name)["index"], ifalias=tag, state="up")
        self._forget_link(name)

    @staticmethod
    def _leftover(link: Any, obj: Veth) -> bool:
        """Whether `link` is what an agent older than link groups left when it died creating `obj`:
        untagged, in no group, and with the name and MAC derived for this endpoint. The MAC hashes
        the whole endpoint ID, which only cellgate does; any other MAC means someone else's link."""
        return (not _attr(link, "IFLA_IFALIAS") and not _attr(link, "IFLA_GROUP")
                and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"
                and _attr(link, "IFLA_ADDRESS") == obj.mac)

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

    def _add_blackhole_device(self, name: str) -> None:
        """A device that holds addresses and silently discards what is routed to it.

        dummy is the usual choice; kernels built without it still have ifb, which drops
        every packet that was not redirected to it by tc, so it serves the same purpose.
        """
        for kind in HOST_DEVICE_KINDS:
            try:
                self.ipr.link("add", ifname=name, kind=kind, group=self.group)
                return
            except NetlinkError as exc:
                if exc.code != errno.EOPNOTSUPP:
                    raise
        raise KernelError("this kernel supports neither dummy nor ifb links")

    def _attach(self, obj: Programs) -> None:
        dp = self._need_dp()
        if obj.revision != dp.revision:
            raise KernelError(f"cannot attach programs of revision {obj.revision[:12]}; loaded is {dp.revision[:12]}")
        index = self._index(obj.dev)
        try:
            self.ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for parent, program in ((TC_INGRESS, FROM), (TC_EGRESS, TO)):
            self.ipr.tc(
                "replace-filter", "bpf", index, ":1", fd=dp.programs[program].fd,
                name=dp.filter_name(program), parent=parent, classid=1, direct_action=True, prio=1,
            )

    def _route(self, command: str, obj: Route, oif: int | None = None) -> None:
        args: dict[str, Any] = {
            "dst": str(obj.dst),
            "proto": naming.RTPROT_CELLGATE,
            "scope": RT_SCOPE_LINK,
            "table": RT_TABLE_MAIN,
            "family": layout.AF[obj.dst.version],
        }
        if command == "del":
            if oif is not None:
                args["oif"] = oif  # only the route through our link, never another instance's
            self.ipr.route("del", **args)
            return
        args["oif"] = self._index(obj.dev)
        if obj.src is not None:
            args["prefsrc"] = str(obj.src)
        self.ipr.route(command, **args)


def _sysctl(path: str, value: str) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as exc:
        log.debug("sysctl %s=%s: %s", path, value, exc)


class Iptables:
    """Masquerade and forwarding for traffic that leaves the host, per network subnet.

    Rules live in chains named after the instance, reached by one commented jump each
    from POSTROUTING and FORWARD, so teardown finds exactly ours.
    """

    def __init__(self, instance: str) -> None:
        self.nat = naming.nat_chain(instance)
        self.fwd = naming.forward_chain(instance)
        self.comment = f"cellgate:{instance}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["iptables", "-w", *args], check=check, capture_output=True, text=True)

    @staticmethod
    def _rules(subnet: ipaddress.IPv4Network) -> list[tuple[str, list[str]]]:
        s = str(subnet)
        return [
            ("nat", ["-s", s, "!", "-d", s, "-j", "MASQUERADE"]),
            ("filter", ["-i", "cg+", "-s", s, "-j", "ACCEPT"]),
            ("filter", ["-o", "cg+", "-d", s, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]),
        ]

    def subnets(self) -> list[ipaddress.IPv4Network]:
        try:
            out = self._run("-t", "nat", "-S", self.nat, check=False)
        except FileNotFoundError:
            return []
        found = []
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["-A", self.nat] and "-s" in parts and "MASQUERADE" in parts:
                found.append(ipaddress.IPv4Network(parts[parts.index("-s") + 1]))
        return found

    def _ensure_chains(self) -> None:
        for table, chain, hook in (("nat", self.nat, "POSTROUTING"), ("filter", self.fwd, "FORWARD")):
            if self._run("-t", table, "-S", chain, check=False).returncode != 0:
                self._run("-t", table, "-N", chain)
            jump = ["-m", "comment", "--comment", self.comment, "-j", chain]
            if self._run("-t", table, "-C", hook, *jump, check=False).returncode != 0:
                self._run("-t", table, "-I", hook, "1", *jump)
        _sysctl("net/ipv4/ip_forward", "1")

    def add(self, subnet: ipaddress.IPv4Network) -> None:
        self._ensure_chains()
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            if self._run("-t", table, "-C", chain, *rule, check=False).returncode != 0:
                self._run("-t", table, "-A", chain, *rule)

    def remove(self, subnet: ipaddress.IPv4Network) -> None:
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            self._run("-t", table, "-D", chain, *rule, check=False)

    def teardown(self) -> bool:
        """Remove our chains and the jumps to them; True if anything was there."""
        found = False
        for table, chain, hook in (("nat", self.nat, "POSTROUTING"), ("filter", self.fwd, "FORWARD")):
            jump = ["-m", "comment", "--comment", self.comment, "-j", chain]
            while self._run("-t", table, "-D", hook, *jump, check=False).returncode == 0:
                found = True
            if self._run("-t", table, "-F", chain, check=False).returncode == 0:
                self._run("-t", table, "-X", chain, check=False)
                found = True
        return found
