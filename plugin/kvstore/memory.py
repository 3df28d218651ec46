"""MemoryStore: an in-memory KVStore with etcd's revisions, leases, transactions, watch from a
revision and compaction, for unit tests. Pure (standard library and the port).

Test controls: `set_available(False)` (every call raises KvstoreUnavailable, watches end),
`cancel_watches()` (the server cancels them), `wipe()` (etcd restarted empty), `expire()` and the
`clock` argument (leases expire lazily on every call).
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plugin.kvstore.port import (
    Compacted,
    Compare,
    Delete,
    Event,
    KeyValue,
    KvstoreError,
    KvstoreUnavailable,
    LeaseNotFound,
    Put,
    Watch,
    compare_holds,
)


@dataclass
class _Watcher:
    prefix: str
    on_events: Callable[[list[Event]], None]
    watch: Watch
    queue: list[list[Event]]
    wake: threading.Condition


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._reset()
        self._available = True
        self._watchers: list[_Watcher] = []

    def _reset(self) -> None:
        self._rev = 1
        self._compacted = 0
        self._data: dict[str, KeyValue] = {}
        self._versions: dict[str, int] = {}
        self._history: list[Event] = []
        self._leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, deadline)
        self._next_lease = 0x1000

    # -- test controls -----------------------------------------------------------------------

    def set_available(self, up: bool) -> None:
        with self._lock:
            self._available = up
            if not up:
                self._end_watches(KvstoreUnavailable("kvstore connection lost"))

    def cancel_watches(self) -> None:
        with self._lock:
            self._end_watches(KvstoreError("watch cancelled by the server"))

    def wipe(self) -> None:
        with self._lock:
            self._end_watches(KvstoreUnavailable("kvstore restarted"))
            self._reset()

    def expire(self) -> None:
        with self._lock:
            self._expire()

    # -- the port ----------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            self._check()
            return self._data.get(key)

    def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        with self._lock:
            self._check()
            return sorted((kv for k, kv in self._data.items() if k.startswith(prefix)),
                          key=lambda kv: kv.key), self._rev

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        with self._lock:
            self._check()
            self._apply([Put(key, value, lease)])
            return self._rev

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        return self.txn([Compare(key, "create", "==", 0)], [Put(key, value, lease)])

    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> bool:
        with self._lock:
            self._check()
            ok = all(compare_holds(c, self._data.get(c.key), self._versions.get(c.key, 0)) for c in compares)
            self._apply(success if ok else failure)
            return ok

    def delete(self, key: str) -> bool:
        with self._lock:
            self._check()
            if key not in self._data:
                return False
            self._apply([Delete(key)])
            return True

    def grant(self, ttl: int) -> int:
        with self._lock:
            self._check()
            self._next_lease += 1
            self._leases[self._next_lease] = (ttl, self._clock() + ttl)
            return self._next_lease

    def keepalive(self, lease: int) -> int:
        with self._lock:
            self._check()
            if lease not in self._leases:
                raise LeaseNotFound(f"lease {lease:x} not found")
            ttl, _ = self._leases[lease]
            self._leases[lease] = (ttl, self._clock() + ttl)
            return ttl

    def lease_ttl(self, lease: int) -> int:
        with self._lock:
            self._check()
            if lease not in self._leases:
                return -1
            return max(0, int(self._leases[lease][1] - self._clock()))

    def revoke(self, lease: int) -> None:
        with self._lock:
            self._check()
            self._drop_lease(lease)

    def watch(self, prefix: str, start_revision: int, on_events: Callable[[builtins.list[Event]], None]) -> Watch:
        with self._lock:
            self._check()
            w = _Watcher(prefix, on_events, Watch(), [], threading.Condition(self._lock))
            w.watch = Watch(lambda: self._remove(w))
            if start_revision and start_revision < self._compacted:  # etcd keeps the compact revision
                w.watch.finish(Compacted(f"revision {start_revision} compacted", self._compacted))
                return w.watch
            backlog = [e for e in self._history if e.revision >= start_revision and e.key.startswith(prefix)] \
                if start_revision else []
            if backlog:
                w.queue.append(backlog)
            self._watchers.append(w)
        threading.Thread(target=self._deliver, args=(w,), name="memkv-watch", daemon=True).start()
        return w.watch

    def compact(self, revision: int) -> None:
        with self._lock:
            self._check()
            if revision <= self._compacted:
                raise Compacted(f"revision {revision} has been compacted", self._compacted)
            if revision > self._rev:
                raise KvstoreError(f"revision {revision} is a future revision")
            self._compacted = revision
            self._history = [e for e in self._history if e.revision >= revision]

    def revision(self) -> int:
        with self._lock:
            self._check()
            return self._rev

    def close(self) -> None:
        with self._lock:
            self._end_watches(None)

    # -- inside ------------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._available:
            raise KvstoreUnavailable("kvstore unavailable")
        self._expire()

    def _expire(self) -> None:
        now = self._clock()
        for lease, (_, deadline) in list(self._leases.items()):
            if deadline <= now:
                self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        if self._leases.pop(lease, None) is None:
            return
        gone = [Delete(k) for k, kv in self._data.items() if kv.lease == lease]
        if gone:
            self._apply(gone)

    def _apply(self, ops: Sequence[Put | Delete]) -> None:
        if not ops:
            return
        for op in ops:  # all or nothing, like an etcd transaction
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseNotFound(f"lease {op.lease:x} not found")
        rev = self._rev + 1
        events = []
        for op in ops:
            if isinstance(op, Put):
                old = self._data.get(op.key)
                self._data[op.key] = KeyValue(op.key, op.value, rev, old.create_revision if old else rev, op.lease)
                self._versions[op.key] = self._versions.get(op.key, 0) + 1
                events.append(Event("put", op.key, op.value, rev))
            elif op.key in self._data:
                del self._data[op.key]
                self._versions.pop(op.key, None)
                events.append(Event("delete", op.key, b"", rev))
        if not events:
            return
        self._rev = rev
        self._history.extend(events)
        for w in self._watchers:
            mine = [e for e in events if e.key.startswith(w.prefix)]
            if mine:
                w.queue.append(mine)
                w.wake.notify_all()

    def _deliver(self, w: _Watcher) -> None:
        while True:
            with self._lock:
                while not w.queue and not w.watch.done:
                    w.wake.wait(0.5)
                if w.watch.done and not w.queue:
                    return
                batch = w.queue.pop(0)
            if w.watch.done:
                return
            w.on_events(batch)

    def _remove(self, w: _Watcher) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)
            w.queue.clear()
            w.wake.notify_all()

    def _end_watches(self, error: BaseException | None) -> None:
        for w in list(self._watchers):
            self._watchers.remove(w)
            w.queue.clear()
            w.watch.finish(error)
            w.wake.notify_all()
