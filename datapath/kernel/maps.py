"""Handlers of the pinned-map kinds (endpoints, addresses, ipcache), and the maps the agent writes
outside plans: policy in batches, conntrack, config. Layouts come from datapath.kernel.layout.
"""

from __future__ import annotations

import ctypes
import ipaddress
import threading
from collections.abc import Iterable
from typing import Any

from datapath.errors import KernelError
from datapath.kernel import layout
from datapath.kernel.context import KernelContext, Replacing
from datapath.plan import AddressEntry, EndpointEntry, IpcacheEntry, Key
from datapath.policy.compile import ExactVerdicts, PolicyKey, PolicyValue

BATCH = 4096


class _Endpoints(Replacing):
    kind = EndpointEntry.kind

    def observe(self, key: Key) -> EndpointEntry | None:
        link = self.ctx.link(key[1])
        if link is None or self.ctx.dp is None:
            return None
        return self._entry(int(link["index"]), key[1])

    def observe_all(self) -> Iterable[EndpointEntry]:
        if self.ctx.dp is None:
            return
        names = self.ctx.owned_names()
        for key, _leaf in list(self.ctx.dp.endpoints.items()):
            index = int(key.value)
            entry = self._entry(index, names.get(index, f"@{index}"))
            if entry is not None:
                yield entry

    def _entry(self, index: int, dev: str) -> EndpointEntry | None:
        try:
            leaf = self.ctx.need_dp().endpoints[ctypes.c_uint32(index)]
        except KeyError:
            return None
        return EndpointEntry(dev, layout.endpoint_value(layout.CgEndpoint.from_buffer_copy(bytes(leaf))))

    def add(self, obj: EndpointEntry) -> None:
        dp = self.ctx.need_dp()
        index = self.ctx.index(obj.dev)
        dp.endpoints[ctypes.c_uint32(index)] = layout.endpoint_struct(obj.value, index)

    def remove(self, obj: EndpointEntry) -> None:
        dp = self.ctx.need_dp()
        index = int(obj.dev[1:]) if obj.dev.startswith("@") else None
        if index is None:
            link = self.ctx.link(obj.dev)
            index = int(link["index"]) if link is not None else None
        if index is not None:
            dp.endpoints.pop(ctypes.c_uint32(index), None)


class _Addresses(Replacing):
    kind = AddressEntry.kind

    def observe(self, key: Key) -> AddressEntry | None:
        return self._entry(ipaddress.ip_address(key[1]))

    def observe_all(self) -> Iterable[AddressEntry]:
        if self.ctx.dp is None:
            return
        names = self.ctx.owned_names()
        for key in list(self.ctx.dp.ips.keys()):
            entry = self._entry(layout.key_address(layout.CgIpKey.from_buffer_copy(bytes(key))), names)
            if entry is not None:
                yield entry

    def _entry(self, address: Any, names: dict[int, str] | None = None) -> AddressEntry | None:
        try:
            leaf = self.ctx.need_dp().ips[layout.ip_key(address)]
        except KeyError:
            return None
        raw = layout.CgEndpoint.from_buffer_copy(bytes(leaf))
        dev = (names or {}).get(raw.ifindex) or self.ctx.ifname(raw.ifindex) or f"@{raw.ifindex}"
        return AddressEntry(address, dev, layout.endpoint_value(raw))

    def add(self, obj: AddressEntry) -> None:
        dp = self.ctx.need_dp()
        index = self.ctx.index(obj.dev)
        dp.ips[layout.ip_key(obj.address)] = layout.endpoint_struct(obj.value, index)

    def remove(self, obj: AddressEntry) -> None:
        dp = self.ctx.need_dp()
        key = layout.ip_key(obj.address)
        try:
            index = layout.CgEndpoint.from_buffer_copy(bytes(dp.ips[key])).ifindex
        except KeyError:
            return
        dp.ips.pop(key, None)
        if self.ctx.ifname(index) is None:
            # The link vanished behind our back (its netns was destroyed), so the endpoint
            # entry can no longer be found by name; it is keyed by the dead ifindex.
            dp.endpoints.pop(ctypes.c_uint32(index), None)


class _Ipcache(Replacing):
    kind = IpcacheEntry.kind

    def observe(self, key: Key) -> IpcacheEntry | None:
        if self.ctx.dp is None:
            return None
        prefix = ipaddress.ip_network(key[1])
        try:
            value = layout.CgIpcacheValue.from_buffer_copy(bytes(self.ctx.dp.ipcache[layout.ipcache_key(prefix)]))
        except KeyError:
            return None
        return IpcacheEntry(prefix, value.identity, layout.ipcache_tunnel_endpoint(value))

    def observe_all(self) -> Iterable[IpcacheEntry]:
        if self.ctx.dp is None:
            return
        for key, value in list(self.ctx.dp.ipcache.items()):
            prefix = layout.ipcache_prefix(layout.CgIpcacheKey.from_buffer_copy(bytes(key)))
            raw = layout.CgIpcacheValue.from_buffer_copy(bytes(value))
            yield IpcacheEntry(prefix, raw.identity, layout.ipcache_tunnel_endpoint(raw))

    def add(self, obj: IpcacheEntry) -> None:
        value = layout.ipcache_value(obj.identity, obj.tunnel_endpoint)
        self.ctx.need_dp().ipcache[layout.ipcache_key(obj.prefix)] = value

    def remove(self, obj: IpcacheEntry) -> None:
        self.ctx.need_dp().ipcache.pop(layout.ipcache_key(obj.prefix), None)


HANDLERS = (_Endpoints, _Addresses, _Ipcache)


# -- maps written outside plans -----------------------------------------------------------------


class Config:
    """cg_config: runtime switches, conntrack timeouts and the policy revision."""

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._config: layout.CgConfig | None = None  # what cg_config holds, once we wrote it
        self.lb_flows = False  # packet-level balancing: replies of balanced flows are translated

    def set(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        cfg = layout.CgConfig()
        cfg.flags = ((layout.CG_CFG_TRACE if trace else 0) | (0 if verdicts else layout.CG_CFG_QUIET)
                     | (layout.CG_CFG_LB_FLOWS if self.lb_flows else 0))
        for name, seconds in timeouts.items():
            setattr(cfg, f"{name}_timeout_ns", int(seconds * 1e9))
        with self._lock:
            cfg.tunnel_ifindex = self._current().tunnel_ifindex  # the tunnel handler's, kept
            cfg.proxy_port = self._current().proxy_port  # the agent's proxy's, kept
        self.write(cfg)

    def tunnel_ifindex(self) -> int:
        with self._lock:
            return int(self._current().tunnel_ifindex)

    def set_tunnel(self, ifindex: int) -> None:
        """Where cg_stage_encap sends tunnelled packets (0: nowhere, native routing)."""
        with self._lock:
            cfg = layout.CgConfig.from_buffer_copy(bytes(self._current()))
        cfg.tunnel_ifindex = ifindex
        self.write(cfg)

    def set_proxy_port(self, port: int) -> None:
        """Where lib/proxy.h finds the L7 proxy's listener (0: no proxy, L7 flows drop)."""
        with self._lock:
            cfg = layout.CgConfig.from_buffer_copy(bytes(self._current()))
        cfg.proxy_port = port
        self.write(cfg)

    def proxy_port(self) -> int:
        with self._lock:
            return int(self._current().proxy_port)

    def policy_revision(self) -> int:
        with self._lock:
            return int(self._current().policy_rev)

    def _current(self) -> layout.CgConfig:
        if self._config is None:
            try:
                raw = self.ctx.need_dp().config[ctypes.c_uint32(0)]
            except KeyError:
                return layout.CgConfig()
            return layout.CgConfig.from_buffer_copy(bytes(raw))
        return self._config

    def write(self, cfg: layout.CgConfig | None = None, bump: bool = False) -> None:
        """Write cg_config, keeping the policy revision, which moves forward (never to 0) when
        the policy map changed, and on this executor's first write: a predecessor may have died
        between changing the map and bumping it, so verdicts cached before are all decided again."""
        dp = self.ctx.need_dp()
        with self._lock:
            current = self._current()
            new = layout.CgConfig.from_buffer_copy(bytes(cfg if cfg is not None else current))
            new.policy_rev = current.policy_rev
            if bump or self._config is None:
                new.policy_rev = current.policy_rev % 0xFFFFFFFF + 1
            dp.config[ctypes.c_uint32(0)] = new
            self._config = new


class PolicyMap:
    """cg_policy, written in batches, and cg_policy_exact, the verdicts of its exact entries
    (ExactVerdicts) that packets look up first; every change bumps the policy revision after the
    writes.

    Nothing opens up on the way: an exact verdict about to change or go is removed before the
    trie changes (a packet meanwhile falls back to the trie, which is right at every step), and
    new verdicts are written once the trie holds what they were derived from."""

    def __init__(self, ctx: KernelContext, config: Config) -> None:
        self.ctx = ctx
        self.config = config
        self.exact: ExactVerdicts | None = None  # built from the maps on first use

    def entries(self) -> dict[PolicyKey, PolicyValue]:
        dp = self.ctx.need_dp()
        out = self._read(dp.policy)
        exact = ExactVerdicts()
        exact.change(out, ())
        held = self._read(dp.policy_exact)
        missing = {k: v for k, v in exact.verdicts.items() if held.get(k) != v}
        # What a crash or an older agent left: exact verdicts no trie entry backs, or stale ones.
        stale = [k for k in held if k not in exact.verdicts or k in missing]
        try:
            self._write(dp.policy_exact, {}, stale)
            self._write(dp.policy_exact, missing, ())
        except Exception as exc:  # BCC raises bare Exception on syscall errors
            raise KernelError(f"policy map update failed: {exc}") from exc
        self.exact = exact
        return out

    @staticmethod
    def _read(table: Any) -> dict[PolicyKey, PolicyValue]:
        out: dict[PolicyKey, PolicyValue] = {}
        for key, value in table.items():
            raw_key = layout.CgPolicyKey.from_buffer_copy(bytes(key))
            out[layout.policy_key_value(raw_key)] = layout.policy_value_value(
                layout.CgPolicyValue.from_buffer_copy(bytes(value)))
        return out

    @staticmethod
    def _write(table: Any, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        items = list(upserts.items())
        gone = list(deletes)
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            table.items_update_batch(layout.policy_keys([k for k, _ in chunk]),
                                     layout.policy_values([v for _, v in chunk]))
        for start in range(0, len(gone), BATCH):
            doomed = gone[start:start + BATCH]
            try:  # all-or-nothing per key: a key that is already gone fails the batch
                table.items_delete_batch(layout.policy_keys(doomed))
            except Exception:  # BCC raises bare Exception; one by one instead
                for key in doomed:
                    table.pop(layout.policy_key(key), None)

    def update(self, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        """Write and remove policy entries, in batches; upserts first, so nothing opens up."""
        dp = self.ctx.need_dp()
        gone = list(deletes)
        if self.exact is None:
            self.entries()
        assert self.exact is not None
        before = dict(self.exact.verdicts)
        writes, removes = self.exact.change(upserts, gone)
        try:
            self._write(dp.policy_exact, {}, removes + [k for k in writes if k in before])
            self._write(dp.policy, upserts, gone)
            self._write(dp.policy_exact, writes, ())
        except Exception as exc:  # BCC raises bare Exception on syscall errors
            self.exact = None  # what the maps hold is read again on next use
            raise KernelError(f"policy map update failed: {exc}") from exc
        finally:
            if upserts or gone:
                self.config.write(bump=True)  # after the writes: cached verdicts decide again


class Conntrack:
    """cg_ct: the agent reads it and deletes what expired."""

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx

    def entries(self) -> list[tuple[layout.CgCtKey, layout.CgCtValue]]:
        return [(layout.CgCtKey.from_buffer_copy(bytes(k)), layout.CgCtValue.from_buffer_copy(bytes(v)))
                for k, v in self.ctx.need_dp().ct.items()]

    def gc(self, now_ns: int) -> int:
        """Delete expired conntrack entries, and idle packet-balanced flows (cg_lb_flows);
        returns how many."""
        dp = self.ctx.need_dp()
        count = 0
        for table in (dp.ct, dp.lb_flows):
            expired = [k for k, v in table.items() if v.expires <= now_ns]
            for key in expired:
                table.pop(key, None)
            count += len(expired)
        return count
