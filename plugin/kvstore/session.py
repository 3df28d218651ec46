"""The node's lease: granted once, kept alive every TTL/3, persisted so that an agent restarted
within the TTL keeps it (its keys are never deleted and re-created), and replaced when lost (an
outage longer than the TTL, a store restarted empty), which tells the owner to re-publish. Pure.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from plugin.kvstore.port import KVStore, KvstoreError, KvstoreUnavailable, LeaseNotFound

log = logging.getLogger(__name__)


class Session:
    RETRY = 0.5

    def __init__(self, store: KVStore, ttl: int, lease_file: Path | None = None,
                 on_new_lease: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.lease_file = lease_file
        self.on_new_lease = on_new_lease
        self.lease_id = 0
        self.healthy = False
        self._ttl_at: tuple[int, float] = (-1, 0.0)

    def ttl_left(self) -> int:
        ttl, at = self._ttl_at
        if ttl < 0:
            return -1
        return max(0, int(ttl - (time.monotonic() - at)))

    def _saved(self) -> int:
        if self.lease_file is None:
            return 0
        try:
            return int(self.lease_file.read_text().strip(), 16)
        except (OSError, ValueError):
            return 0

    def _save(self, lease: int) -> None:
        if self.lease_file is None:
            return
        self.lease_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.lease_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{lease:x}\n")
        os.replace(tmp, self.lease_file)

    def start(self) -> int:
        """Reuse the persisted lease while it lives, else grant one. Raises KvstoreUnavailable."""
        saved = self._saved()
        if saved:
            try:
                self._ttl_at = (self.store.keepalive(saved), time.monotonic())
                self.lease_id = saved
                self.healthy = True
                log.info("kvstore lease %x reused", saved)
                return saved
            except LeaseNotFound:
                pass
        self._grant()
        return self.lease_id

    def _grant(self) -> None:
        lease = self.store.grant(self.ttl)
        self._save(lease)
        self.lease_id = lease
        self.healthy = True
        self._ttl_at = (self.ttl, time.monotonic())
        log.info("kvstore lease %x granted (ttl %d s)", lease, self.ttl)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.lease_id == 0:
                    self.start()
                    if self.on_new_lease:
                        self.on_new_lease(self.lease_id)
                else:
                    self._ttl_at = (self.store.keepalive(self.lease_id), time.monotonic())
                    self.healthy = True
                wait = max(self.ttl / 3.0, 0.3)
            except LeaseNotFound:
                log.warning("kvstore lease %x is gone; taking a new one", self.lease_id)
                try:
                    self._grant()
                    if self.on_new_lease:
                        self.on_new_lease(self.lease_id)
                    wait = max(self.ttl / 3.0, 0.3)
                except KvstoreError as exc:
                    self.healthy = False
                    log.info("kvstore: %s", exc)
                    wait = self.RETRY
            except KvstoreUnavailable as exc:
                if self.healthy:
                    log.warning("kvstore unavailable: %s", exc)
                self.healthy = False
                wait = self.RETRY
            except KvstoreError as exc:
                self.healthy = False
                log.warning("kvstore lease: %s", exc)
                wait = self.RETRY
            except Exception:
                self.healthy = False
                log.exception("kvstore lease")
                wait = self.RETRY
            if stop.wait(wait):
                return

    def revoke(self) -> None:
        if self.lease_id:
            self.store.revoke(self.lease_id)
            self.lease_id = 0
