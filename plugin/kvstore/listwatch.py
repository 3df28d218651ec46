"""List, then watch from the list's revision; on any end of the watch, list again (Cilium's
ListAndWatch). Pure over the port.

A list reports new and changed keys (mod revision or value differs from the cache), synthesises
deletions for cached keys that are gone, then calls `synced()`; the watch that follows starts at the
list's revision + 1, so no change is missed and none is reported twice. Compaction, a server cancel,
a lost connection: back off, re-list.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from plugin.kvstore.port import Event, KVStore, KvstoreError

log = logging.getLogger(__name__)


class Handler(Protocol):
    def upsert(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def synced(self) -> None: ...


class ListWatcher:
    def __init__(self, store: KVStore, prefix: str, handler: Handler, name: str = "",
                 backoff: tuple[float, float] = (0.1, 2.0)) -> None:
        self.store = store
        self.prefix = prefix
        self.handler = handler
        self.name = name or prefix
        self.backoff = backoff
        self.revision = 0
        self.synced_once = False
        self.connected = False
        self.last_error = ""
        self.relists = 0
        self._cache: dict[str, tuple[int, bytes]] = {}  # key -> (mod revision, value)
        self._synced = threading.Event()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def run(self, stop: threading.Event) -> None:
        delay = self.backoff[0]
        while not stop.is_set():
            try:
                self._list()
                delay = self.backoff[0]
                self._watch(stop)
            except KvstoreError as exc:
                self.connected = False
                self.last_error = str(exc)
                log.info("kvstore %s: %s; listing again in %.1f s", self.name, exc, delay)
            except Exception:  # never end the loop
                self.connected = False
                log.exception("kvstore %s", self.name)
            if stop.wait(delay):
                return
            delay = min(delay * 2, self.backoff[1])
            self.relists += 1

    def _call(self, fn: str, *args: object) -> None:
        try:
            getattr(self.handler, fn)(*args)
        except Exception:
            log.exception("kvstore %s: handler %s", self.name, fn)

    def _list(self) -> None:
        items, revision = self.store.list(self.prefix)
        self.connected = True
        self.last_error = ""
        seen = set()
        for kv in items:
            seen.add(kv.key)
            # The value too: a store restarted empty reuses small revisions for other values.
            if self._cache.get(kv.key) != (kv.mod_revision, kv.value):
                self._cache[kv.key] = (kv.mod_revision, kv.value)
                self._call("upsert", kv.key, kv.value)
        for key in [k for k in self._cache if k not in seen]:
            del self._cache[key]
            self._call("delete", key)
        self.revision = revision
        self.synced_once = True
        self._synced.set()
        self._call("synced")

    def _watch(self, stop: threading.Event) -> None:
        batches: queue.Queue[list[Event]] = queue.Queue()
        watch = self.store.watch(self.prefix, self.revision + 1, batches.put)
        try:
            while not stop.is_set():
                try:
                    batch = batches.get(timeout=0.2)
                except queue.Empty:
                    if watch.wait(0) and batches.empty():
                        break
                    continue
                for ev in batch:
                    self._event(ev)
        finally:
            if not watch.wait(0):
                watch.cancel()
        if watch.error is not None and not stop.is_set():
            raise watch.error if isinstance(watch.error, KvstoreError) else KvstoreError(str(watch.error))
        if not stop.is_set():
            raise KvstoreError("watch ended")

    def _event(self, ev: Event) -> None:
        self.revision = max(self.revision, ev.revision)
        if ev.kind == "put":
            if self._cache.get(ev.key) == (ev.revision, ev.value):
                return
            self._cache[ev.key] = (ev.revision, ev.value)
            self._call("upsert", ev.key, ev.value)
        elif ev.key in self._cache:
            del self._cache[ev.key]
            self._call("delete", ev.key)
