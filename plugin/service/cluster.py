"""Multi-host use cases: this node's registration, cluster identities, the shared ipcache.

Three list-watch loops mirror the store (nodes, ipcache, identities) into caches; one reconciler
compares what this node should have published with what the store holds and fixes the
difference (so an etcd restarted empty, a compaction or an expired lease are repaired the same
way), then hands the peers and their endpoints to the Agent as a datapath.nodes.ClusterView.
Store data is parsed by plugin.service.cluster_keys; anything bad is logged and skipped.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath import identity as ids
from datapath.errors import CellgateError, StateError
from datapath.nodes import ClusterView, Node, RemoteEntry
from plugin.kvstore.listwatch import ListWatcher
from plugin.kvstore.port import KVStore, KvstoreError
from plugin.kvstore.session import Session
from plugin.service import cluster_keys as keys
from plugin.service.cluster_identities import ClusterIdentities, IdentityAllocator, IdentityCache
from plugin.service.services import AgentServices

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 1.0  # seconds between passes when nothing happened (repairs, retries, GC)


@dataclass(frozen=True)
class ClusterSettings:
    node: Node
    tunnel: str
    lease_ttl: int
    state_dir: Path  # <agent state>/cluster: uid, lease, cached view


def node_uid(state_dir: Path, create: bool) -> str:
    """This agent's lasting ID (kept in its state directory): a restart is the same node."""
    path = state_dir / "uid"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return ""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    uid = secrets.token_hex(8)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(uid)
    os.replace(tmp, path)
    return uid


def check_registration(store: KVStore, record: keys.NodeRecord) -> None:
    """Refuse to start when a live node holds this name (another agent) or an overlapping range."""
    items, _ = store.list(keys.NODES)
    for kv in items:
        try:
            other = keys.parse_node(kv.key, kv.value)
        except keys.BadData as exc:
            log.warning("skipping bad node record %s: %s", kv.key, exc)
            continue
        why = keys.clash(record, other)
        if why:
            raise StateError(f"cannot join the cluster: {why}")


class _Cache:
    """A handler of one ListWatcher: parses every key, keeps the good ones, counts the bad."""

    def __init__(self, name: str, parse: Callable[[str, bytes], Any], changed: Callable[[], None]) -> None:
        self.name = name
        self._parse = parse
        self._changed = changed
        self._lock = threading.Lock()
        self.items: dict[str, Any] = {}
        self.bad = 0
        self.synced_at = 0.0

    def upsert(self, key: str, value: bytes) -> None:
        try:
            parsed = self._parse(key, value)
        except keys.BadData as exc:
            self.bad += 1
            log.warning("kvstore: skipping %s: %s", key, exc)
            with self._lock:
                self.items.pop(key, None)
            self._changed()
            return
        with self._lock:
            self.items[key] = parsed
        self._changed()

    def delete(self, key: str) -> None:
        with self._lock:
            self.items.pop(key, None)
        self._changed()

    def synced(self) -> None:
        self.synced_at = time.monotonic()
        self._changed()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.items)


class _IdentityHandler:
    def __init__(self, cache: IdentityCache, changed: Callable[[], None]) -> None:
        self.cache = cache
        self._changed = changed
        self.bad = 0
        self.synced_at = 0.0

    def upsert(self, key: str, value: bytes) -> None:
        try:
            self.cache.upsert(key, value)
        except keys.BadData as exc:
            self.bad += 1
            self.cache.delete(key)
            log.warning("kvstore: skipping %s: %s", key, exc)
        self._changed()

    def delete(self, key: str) -> None:
        self.cache.delete(key)
        self._changed()

    def synced(self) -> None:
        self.synced_at = time.monotonic()
        self._changed()


@dataclass
class _Published:
    """Facts about the last reconcile pass, for `cellgate status`."""

    clash: str = ""
    passes: int = 0
    errors: int = 0
    last_error: str = ""
    view_changes: int = 0
    renumbered: list[tuple[int, int]] = field(default_factory=list)


class ClusterService:
    def __init__(self, agent: AgentServices, store: KVStore, settings: ClusterSettings,
                 identities: ClusterIdentities) -> None:
        self.agent = agent
        self.store = store
        self.settings = settings
        self.identities = identities
        self.node = settings.node
        self.uid = node_uid(settings.state_dir, create=True)
        self.record = keys.NodeRecord(self.node, self.uid, settings.tunnel)
        self.dirty = threading.Event()
        self.session = Session(store, settings.lease_ttl, settings.state_dir / "lease", self._new_lease)
        self.allocator = IdentityAllocator(store, self.node.name, lambda: self.session.lease_id, identities.cache)
        identities.allocator = self.allocator
        identities.online = self._online
        self.nodes = _Cache("nodes", keys.parse_node, self.dirty.set)
        self.ips = _Cache("ipcache", keys.parse_ip, self.dirty.set)
        self.ident_handler = _IdentityHandler(identities.cache, self.dirty.set)
        self.services = _Cache("services", keys.parse_service, self.dirty.set)
        self.watchers = [
            ListWatcher(store, keys.NODES, self.nodes, "nodes"),
            ListWatcher(store, keys.IPCACHE, self.ips, "ipcache"),
            ListWatcher(store, keys.IDENTITIES, self.ident_handler, "identities"),
            ListWatcher(store, keys.SERVICES, self.services, "services"),
        ]
        self.state = _Published()
        self._policy_version = -1
        self._collect_after: dict[int, float] = {}
        self._view_file = settings.state_dir / "view.json"
        agent.listeners.append(self.dirty.set)
        agent.service_listeners.append(self.dirty.set)

    # -- start -------------------------------------------------------------------------------

    def cached_view(self) -> ClusterView | None:
        """The view persisted by the last run: kept in the kernel until the store says otherwise,
        so a restart while etcd is away changes no flow to or from the peers."""
        try:
            doc = json.loads(self._view_file.read_text())
            peers = tuple(Node(p["name"], ipaddress.IPv4Address(p["address"]),
                               ipaddress.IPv4Network(p["ipv4"]) if p.get("ipv4") else None,
                               ipaddress.IPv6Network(p["ipv6"]) if p.get("ipv6") else None) for p in doc["peers"])
            entries = tuple(RemoteEntry(ipaddress.ip_network(e[0]), int(e[1]), ipaddress.IPv4Address(e[2]))
                            for e in doc["entries"])
        except FileNotFoundError:
            return ClusterView(self.node, (), (), self.settings.tunnel)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignoring the cached cluster view %s: %s", self._view_file, exc)
            return ClusterView(self.node, (), (), self.settings.tunnel)
        return ClusterView(self.node, peers, entries, self.settings.tunnel)

    def start(self) -> None:
        """Register (or learn that the store is away: then work from the cached state and retry)."""
        try:
            check_registration(self.store, self.record)
            self.session.start()
            self.store.put(keys.node_key(self.node.name), self.record.encode(), self.session.lease_id)
            log.info("registered node %s (%s) under lease %x, ttl %d s", self.node.name, self.node.address,
                     self.session.lease_id, self.settings.lease_ttl)
        except KvstoreError as exc:
            log.warning("kvstore unavailable at start (%s): working from cached state until it answers", exc)

    def threads(self, stop: threading.Event) -> list[threading.Thread]:
        out = [threading.Thread(target=self.session.run, args=(stop,), name="kv-lease", daemon=True)]
        out += [threading.Thread(target=w.run, args=(stop,), name=f"kv-{w.name}", daemon=True)
                for w in self.watchers]
        out.append(threading.Thread(target=self.run, args=(stop,), name="cluster", daemon=True))
        return out

    def _online(self) -> bool:
        return self.session.healthy and self.session.lease_id != 0

    def _new_lease(self, lease: int) -> None:
        log.warning("new kvstore lease %x: re-publishing this node's keys", lease)
        self.dirty.set()

    # -- the reconciler ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.dirty.wait(RECONCILE_INTERVAL)
            if stop.is_set():
                return
            self.dirty.clear()
            try:
                self.reconcile()
            except (CellgateError, OSError) as exc:
                self.state.errors += 1
                self.state.last_error = str(exc)
                log.warning("cluster reconcile: %s", exc)
                stop.wait(0.2)
            except Exception as exc:  # never end the loop; the next pass retries
                self.state.errors += 1
                self.state.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("cluster reconcile")
                stop.wait(0.5)

    def synced(self) -> bool:
        return all(w.synced_once for w in self.watchers)

    def reconcile(self) -> None:
        self.state.passes += 1
        if self._online() and self.synced() and self._publish_node():
            self._publish_identities()
            self._publish_ips()
            self._publish_services()
            self._collect()
        self._apply_view()
        self._apply_services()

    def _publish_node(self) -> bool:
        for other in self.nodes.snapshot().values():
            why = keys.clash(self.record, other)
            if why:
                if why != self.state.clash:
                    log.error("not publishing this node: %s", why)
                self.state.clash = why
                return False
        self.state.clash = ""
        want = self.record.encode()
        key = keys.node_key(self.node.name)
        have = self.nodes.snapshot().get(key)
        if have != self.record:  # absent: first start, expired lease, or a store restarted empty
            self.store.put(key, want, self.session.lease_id)
        return True

    def _publish_identities(self) -> None:
        """Every identity held here is referenced in the store under its number; renumber those the
        cluster knows by another number, and give pending ones their cluster number."""
        masters, refs = self.identities.cache.snapshot()
        for number, labels in sorted(self.identities.local().items()):
            if keys.cluster_number(number) and masters.get(number) == labels and self.node.name in refs.get(number, ()):
                continue
            preferred = number if keys.cluster_number(number) else None
            try:
                cluster = self.allocator.claim(labels, preferred)
            except CellgateError as exc:
                log.warning("identity %d (%s): %s", number, ", ".join(sorted(map(str, labels))), exc)
                continue
            if cluster != number:
                self.state.renumbered.append((number, cluster))
                del self.state.renumbered[:-20]
                self.agent.renumber_identity(number, cluster)
        for number in sorted(self.identities.unclaim_later):
            if number in self.identities.local():
                self.identities.unclaim_later.discard(number)
                continue
            self.allocator.unclaim(number)
            self.identities.unclaim_later.discard(number)

    def _own_ips(self) -> dict[str, bytes]:
        out = {}
        for ep in list(self.agent.endpoints.values()):  # a copy: the Agent changes it under its lock
            if not keys.cluster_number(ep.identity):
                continue  # pending or init: unknown to peers, so they fail closed
            for addr in ep.addresses:
                rec = keys.IpRecord(addr.ip, ep.identity, self.node.name, self.node.address)
                out[keys.ip_key(addr.ip)] = rec.encode()
        return out

    def _publish_ips(self) -> None:
        want = self._own_ips()
        have = {k: v for k, v in self.ips.snapshot().items() if v.node == self.node.name}
        for key, value in want.items():
            current = have.get(key)
            if current is None or current.encode() != value:
                self.store.put(key, value, self.session.lease_id)
        for key in have.keys() - want.keys():
            self.store.delete(key)

    def _publish_services(self) -> None:
        """This node's services under its lease; its keys of services deleted here go."""
        want = {keys.service_key(s.name): keys.encode_service(s) for s in self.agent.own_services()}
        have = {k: v for k, v in self.services.snapshot().items() if v.node == self.node.name}
        for key, value in want.items():
            current = have.get(key)
            if current is None or keys.encode_service(current) != value:
                self.store.put(key, value, self.session.lease_id)
        for key in have.keys() - want.keys():
            self.store.delete(key)

    def _apply_services(self) -> None:
        """The peers' services (those of live nodes only: a node's lease keeps its services)."""
        if not self.synced():
            return
        live = {rec.node.name for rec in self.nodes.snapshot().values()}
        peers = [s for s in self.services.snapshot().values() if s.node != self.node.name and s.node in live]
        self.agent.set_remote_services(peers)

    def _collect(self) -> None:
        """Identities no node references any more (their users' leases expired): delete them after
        a grace of one pass, so a claim racing with the expiry wins."""
        masters, refs = self.identities.cache.snapshot()
        now = time.monotonic()
        local = self.identities.local()
        for number in masters:
            if refs.get(number) or number in local:
                self._collect_after.pop(number, None)
                continue
            due = self._collect_after.setdefault(number, now + RECONCILE_INTERVAL)
            if now >= due:
                self.allocator.collect(number)
                self._collect_after.pop(number, None)
        for number in list(self._collect_after):
            if number not in masters:
                del self._collect_after[number]

    # -- the view ------------------------------------------------------------------------------

    def view(self) -> ClusterView:
        peers: dict[str, Node] = {}
        for rec in self.nodes.snapshot().values():
            if rec.node.name != self.node.name and not keys.clash(self.record, rec):
                peers[rec.node.name] = rec.node
            elif rec.node.name != self.node.name:
                log.debug("ignoring clashing node %s", rec.node.name)
        entries = []
        for rec in self.ips.snapshot().values():
            peer = peers.get(rec.node)
            if peer is None or rec.host_ip != peer.address or not _inside(rec.address, peer):
                continue  # unknown node, or an address outside the node's own ranges: foreign
            entries.append(rec.entry)
        return ClusterView(self.node, tuple(sorted(peers.values(), key=lambda n: n.name)),
                           tuple(sorted(entries, key=lambda e: e.order)),
                           self.settings.tunnel)

    def _apply_view(self) -> None:
        if not self.synced():
            return  # the cached view stays until every list is complete
        view = self.view()
        version = self.identities.cache.version
        changed = self.agent.set_cluster_view(view)
        if changed:
            self.state.view_changes += 1
            self._save_view(view)
        elif version != self._policy_version:
            self.agent.policy_resync()
        self._policy_version = version

    def _save_view(self, view: ClusterView) -> None:
        doc = {
            "peers": [{"name": p.name, "address": str(p.address),
                       "ipv4": str(p.ipv4_range) if p.ipv4_range else "",
                       "ipv6": str(p.ipv6_range) if p.ipv6_range else ""} for p in view.peers],
            "entries": [e.row for e in view.entries],
        }
        tmp = self._view_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self._view_file)

    # -- views for the API ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        revision = max((w.revision for w in self.watchers), default=0)
        return {
            "backend": "etcd",
            "connected": all(w.connected for w in self.watchers) and self.session.healthy,
            "synced": self.synced(),
            "last_revision": revision,
            "lease_id": f"{self.session.lease_id:x}",
            "lease_ttl": self.settings.lease_ttl,
            "lease_ttl_left": self.session.ttl_left(),
            "relists": sum(w.relists for w in self.watchers),
            "bad_keys": self.nodes.bad + self.ips.bad + self.ident_handler.bad + self.services.bad,
            "last_error": self.state.last_error or next((w.last_error for w in self.watchers if w.last_error), ""),
            "clash": self.state.clash,
            "node": {"name": self.node.name, "address": str(self.node.address), "tunnel": self.settings.tunnel},
            "peers": len(self.view().peers) if self.synced() else None,
            "pending_identities": sorted(n for n in self.identities.local() if ids.is_pending(n)),
        }

    def node_list(self) -> list[dict[str, Any]]:
        out = []
        counts: dict[str, int] = {}
        for rec in self.ips.snapshot().values():
            counts[rec.node] = counts.get(rec.node, 0) + 1
        names = set()
        for rec in sorted(self.nodes.snapshot().values(), key=lambda r: r.node.name):
            n = rec.node
            names.add(n.name)
            out.append({"name": n.name, "address": str(n.address),
                        "ipv4_range": str(n.ipv4_range) if n.ipv4_range else "",
                        "ipv6_range": str(n.ipv6_range) if n.ipv6_range else "",
                        "tunnel": rec.tunnel, "local": n.name == self.node.name,
                        "endpoints": counts.get(n.name, 0), "clash": keys.clash(self.record, rec)})
        if self.node.name not in names:  # not (yet) in the store: show it, marked
            n = self.node
            out.append({"name": n.name, "address": str(n.address),
                        "ipv4_range": str(n.ipv4_range) if n.ipv4_range else "",
                        "ipv6_range": str(n.ipv6_range) if n.ipv6_range else "", "tunnel": self.settings.tunnel,
                        "local": True, "endpoints": len(self._own_ips()), "registered": False, "clash": ""})
        return out

    def users(self) -> dict[int, list[str]]:
        """Which nodes use each cluster identity."""
        _, refs = self.identities.cache.snapshot()
        return {n: sorted(u) for n, u in refs.items()}

    def close(self) -> None:
        """Leave the keys to their lease: a restart within the TTL finds them and keeps them."""
        self.store.close()


def _inside(address: ipaddress.IPv4Address | ipaddress.IPv6Address, node: Node) -> bool:
    rng = node.ipv4_range if address.version == 4 else node.ipv6_range
    return rng is not None and address in rng
