"""The kvstore port: the few operations cellgate needs from etcd, as plain values. Pure.

Keys are text, values bytes. Every call raises KvstoreUnavailable (never hangs) when the store
cannot be reached within the adapter's timeout.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from datapath.errors import CellgateError


class KvstoreError(CellgateError):
    status = 503


class KvstoreUnavailable(KvstoreError):
    """The store did not answer within the timeout."""


class Compacted(KvstoreError):
    """A watch asked for a revision the store has compacted away."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseNotFound(KvstoreError):
    """The lease expired or was revoked (or the store was restarted empty)."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # "put" | "delete"
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Compare:
    key: str
    target: str  # "value" | "mod" | "create" | "version"
    op: str  # "==" | "!=" | "<" | ">"
    operand: bytes | int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


class Watch:
    """A running watch: the adapter's thread calls on_events; `finish` records why it ended."""

    def __init__(self, cancel: Callable[[], None] = lambda: None) -> None:
        self._cancel = cancel
        self._done = threading.Event()
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel()
        self.finish(None)

    def finish(self, error: BaseException | None) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class KVStore(Protocol):
    def get(self, key: str) -> KeyValue | None: ...
    def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]: ...
    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...
    def create(self, key: str, value: bytes, lease: int = 0) -> bool: ...
    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def grant(self, ttl: int) -> int: ...
    def keepalive(self, lease: int) -> int: ...
    def lease_ttl(self, lease: int) -> int: ...
    def revoke(self, lease: int) -> None: ...
    def watch(self, prefix: str, start_revision: int, on_events: Callable[[builtins.list[Event]], None]) -> Watch: ...
    def compact(self, revision: int) -> None: ...
    def revision(self) -> int: ...
    def close(self) -> None: ...


def compare_holds(cmp: Compare, kv: KeyValue | None, version: int) -> bool:
    """etcd's comparison of one key (absent keys have revisions 0 and an empty value)."""
    if cmp.target == "value":
        have: bytes | int = kv.value if kv else b""
    elif cmp.target == "mod":
        have = kv.mod_revision if kv else 0
    elif cmp.target == "create":
        have = kv.create_revision if kv else 0
    elif cmp.target == "version":
        have = version
    else:
        raise ValueError(f"unknown compare target {cmp.target!r}")
    want = cmp.operand
    if cmp.op == "==":
        return have == want
    if cmp.op == "!=":
        return have != want
    if cmp.op == "<":
        return have < want  # type: ignore[operator]
    if cmp.op == ">":
        return have > want  # type: ignore[operator]
    raise ValueError(f"unknown compare op {cmp.op!r}")
