"""EtcdStore: the kvstore port over etcd v3's gRPC API, through aetcd's generated stubs (aetcd.rpc).

One asyncio loop in a daemon thread ("kvstore") owns the gRPC channel; the port's synchronous calls
run on it with a timeout, so no call ever hangs. On a failed call the next endpoint is tried. A watch
is one bidirectional stream per prefix; compaction, a server cancel and a lost stream end it with
the port's error, and the caller (plugin.kvstore.listwatch) lists again. Importing connects nothing.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

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
)
from plugin.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENDPOINT = re.compile(r"http://(?P<host>[^/\s:]+):(?P<port>\d{1,5})/?")
_TARGETS = {"value": "VALUE", "mod": "MOD", "create": "CREATE", "version": "VERSION"}
_OPS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


# A channel of its own (gRPC otherwise shares subchannels process-wide, so a new channel would
# inherit a dead one's reconnect backoff and fail at once after etcd came back), reconnecting fast.
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _never_sent(exc: Any) -> bool:
    """A gRPC failure to connect (nothing reached the server), as opposed to one during a call."""
    return bool(exc.code().name == "UNAVAILABLE" and "failed to connect" in (exc.details() or ""))


def parse_endpoint(url: str) -> str:
    m = _ENDPOINT.fullmatch(url)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise KvstoreError(f"kvstore endpoint {url!r} is not http://HOST:PORT (TLS is not supported yet)")
    return f"{m['host']}:{m['port']}"


def _scope(key: str) -> str:
    """'cellgate/state/identities/v1/id/300' -> 'cellgate/state/identities/v1' (the metric's scope)."""
    parts = key.split("/")
    return "/".join(parts[:4]) if len(parts) > 4 else ""


def _kind(key: str) -> str:
    parts = key.split("/")
    return parts[2] if len(parts) > 3 else ""


def _range_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdStore:
    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0) -> None:
        from aetcd import rpc  # type: ignore[import-untyped]  # the generated etcd v3 stubs

        self._rpc = rpc
        self._targets = [parse_endpoint(u) for u in endpoints]
        if not self._targets:
            raise KvstoreError("no kvstore endpoint given")
        self.timeout = timeout
        self.telemetry = Telemetry()  # operation durations, for the metrics
        self._current = 0
        self._stubs: dict[str, Any] | None = None
        self._channel: Any = None
        # One channel per endpoint for the store's lifetime, made at its first use: a channel reconnects
        # by itself, and one closed only lets go of its sockets (connections etcd holds too) when the
        # garbage collector breaks gRPC's reference cycles, so a new channel per failure piled them up.
        self._channels: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore", daemon=True)
        self._thread.start()
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------

    def _run(self, make: Callable[[], Awaitable[T]], action: str = "", key: str = "") -> T:
        """One call, timed for cilium_kvstore_operations_duration_seconds by action and the key's kind."""
        started = time.monotonic()
        outcome = "fail"
        try:
            result = self._call_sync(make)
            outcome = "success"
            return result
        finally:
            if action:
                self.telemetry.observe("kvstore_operation", time.monotonic() - started, action=action,
                                       kind=_kind(key), outcome=outcome, scope=_scope(key))

    def _call_sync(self, make: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise KvstoreUnavailable("kvstore client closed")
        fut = asyncio.run_coroutine_threadsafe(self._call(make), self._loop)
        try:
            return fut.result(self.timeout + 0.5)
        except TimeoutError:
            fut.cancel()
            self._rotate()
            raise KvstoreUnavailable(f"etcd at {self.endpoint} did not answer within {self.timeout:g} s") from None

    @property
    def endpoint(self) -> str:
        return self._targets[self._current]

    def _rotate(self) -> None:
        """The next endpoint's channel for the next call (the same one when there is one endpoint)."""
        self._current = (self._current + 1) % len(self._targets)
        self._channel, self._stubs = None, None

    def _stub(self, name: str) -> Any:
        if self._stubs is None:
            rpc = self._rpc
            if self.endpoint not in self._channels:
                channel = rpc.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
                self._channels[self.endpoint] = (channel, {"kv": rpc.KVStub(channel), "lease": rpc.LeaseStub(channel),
                                                           "watch": rpc.WatchStub(channel)})
            self._channel, self._stubs = self._channels[self.endpoint]
        return self._stubs[name]

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        deadline = self._loop.time() + self.timeout
        tries = len(self._targets)
        while True:
            tries -= 1
            try:
                return await asyncio.wait_for(make(), max(deadline - self._loop.time(), 0.01))
            except TimeoutError:
                self._rotate()
                raise KvstoreUnavailable(
                    f"etcd at {self.endpoint} did not answer within {self.timeout:g} s") from None
            except self._rpc.AioRpcError as exc:
                # Not connected at all: the request was never sent, so even a mutation may go to
                # the next endpoint within the same call (and the same deadline).
                if tries > 0 and _never_sent(exc) and self._loop.time() < deadline:
                    log.info("kvstore: %s unreachable, trying the next endpoint", self.endpoint)
                    self._rotate()
                    continue
                raise self._error(exc) from None

    def _error(self, exc: Any) -> KvstoreError:
        code = exc.code().name
        detail = exc.details() or code
        if "lease not found" in detail:
            return LeaseNotFound(detail)
        if "compacted" in detail:
            return Compacted(detail)
        if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"):
            self._rotate()
            return KvstoreUnavailable(f"etcd {self.endpoint}: {detail}")
        return KvstoreError(f"etcd: {detail}")

    @staticmethod
    def _kv(kv: Any) -> KeyValue:
        return KeyValue(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)

    def _op(self, op: Put | Delete) -> Any:
        rpc = self._rpc
        if isinstance(op, Put):
            return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease))
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))

    def _compare(self, c: Compare) -> Any:
        rpc = self._rpc
        msg = rpc.Compare(key=c.key.encode(), result=rpc.Compare.CompareResult.Value(_OPS[c.op]),
                          target=rpc.Compare.CompareTarget.Value(_TARGETS[c.target]))
        if c.target == "value":
            msg.value = bytes(c.operand)
        elif c.target == "mod":
            msg.mod_revision = int(c.operand)
        elif c.target == "create":
            msg.create_revision = int(c.operand)
        else:
            msg.version = int(c.operand)
        return msg

    # -- the port ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        resp = self._run(lambda: self._stub("kv").Range(self._rpc.RangeRequest(key=key.encode())), "Get", key)
        return self._kv(resp.kvs[0]) if resp.kvs else None

    def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        raw = prefix.encode()
        resp = self._run(lambda: self._stub("kv").Range(self._rpc.RangeRequest(key=raw, range_end=_range_end(raw))),
                         "List", prefix)
        return sorted((self._kv(kv) for kv in resp.kvs), key=lambda kv: kv.key), resp.header.revision

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = self._run(lambda: self._stub("kv").Put(self._rpc.PutRequest(key=key.encode(), value=value,
                                                                            lease=lease)), "Update", key)
        return int(resp.header.revision)

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        return self.txn([Compare(key, "create", "==", 0)], [Put(key, value, lease)])

    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> bool:
        req = self._rpc.TxnRequest(compare=[self._compare(c) for c in compares],
                                   success=[self._op(o) for o in success], failure=[self._op(o) for o in failure])
        first = (compares[0].key if compares else success[0].key if success else "")
        return bool(self._run(lambda: self._stub("kv").Txn(req), "Txn", first).succeeded)

    def delete(self, key: str) -> bool:
        resp = self._run(lambda: self._stub("kv").DeleteRange(self._rpc.DeleteRangeRequest(key=key.encode())),
                         "Delete", key)
        return bool(resp.deleted > 0)

    def grant(self, ttl: int) -> int:
        resp = self._run(lambda: self._stub("lease").LeaseGrant(self._rpc.LeaseGrantRequest(TTL=ttl)), "LeaseGrant")
        if resp.error:
            raise KvstoreError(f"etcd lease grant: {resp.error}")
        return int(resp.ID)

    def keepalive(self, lease: int) -> int:
        async def once() -> Any:
            call = self._stub("lease").LeaseKeepAlive()
            await call.write(self._rpc.LeaseKeepAliveRequest(ID=lease))
            reply = await call.read()
            call.cancel()
            return reply

        reply = self._run(once, "LeaseKeepAlive")
        if reply is None or reply.TTL <= 0:
            raise LeaseNotFound(f"lease {lease:x} not found")
        return int(reply.TTL)

    def lease_ttl(self, lease: int) -> int:
        resp = self._run(lambda: self._stub("lease").LeaseTimeToLive(self._rpc.LeaseTimeToLiveRequest(ID=lease)))
        return int(resp.TTL) if resp.TTL > 0 else -1

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseNotFound):
            self._run(lambda: self._stub("lease").LeaseRevoke(self._rpc.LeaseRevokeRequest(ID=lease)))

    def compact(self, revision: int) -> None:
        self._run(lambda: self._stub("kv").Compact(self._rpc.CompactionRequest(revision=revision, physical=True)))

    def revision(self) -> int:
        return self.list("\0")[1]

    def watch(self, prefix: str, start_revision: int, on_events: Callable[[builtins.list[Event]], None]) -> Watch:
        raw = prefix.encode()
        holder: dict[str, Any] = {}

        def cancel() -> None:
            if "task" in holder:
                self._loop.call_soon_threadsafe(holder["task"].cancel)

        watch = Watch(cancel)

        async def stream() -> None:
            rpc = self._rpc
            error: BaseException | None = None
            try:
                call = self._stub("watch").Watch()
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=raw, range_end=_range_end(raw), start_revision=start_revision)))
                while True:
                    resp = await call.read()
                    if resp is None or resp == self._grpc_eof():
                        error = KvstoreUnavailable("etcd watch stream ended")
                        break
                    if resp.compact_revision:
                        error = Compacted(f"revision {start_revision} compacted (at {resp.compact_revision})",
                                          resp.compact_revision)
                        break
                    if resp.canceled:
                        error = KvstoreError(f"watch cancelled by the server: {resp.cancel_reason or 'no reason'}")
                        break
                    if resp.events:
                        batch = [Event("put" if ev.type == 0 else "delete", ev.kv.key.decode(),
                                       bytes(ev.kv.value) if ev.type == 0 else b"", ev.kv.mod_revision)
                                 for ev in resp.events]
                        try:
                            on_events(batch)
                        except Exception:
                            log.exception("watch callback")
            except asyncio.CancelledError:
                error = None
            except self._rpc.AioRpcError as exc:
                error = self._error(exc)
            except Exception as exc:  # end the watch with the reason, never silently
                error = KvstoreError(f"etcd watch: {exc}")
            watch.finish(error)

        def begin() -> None:
            holder["task"] = self._loop.create_task(stream())

        if self._closed:
            raise KvstoreUnavailable("kvstore client closed")
        self._loop.call_soon_threadsafe(begin)
        return watch

    def _grpc_eof(self) -> Any:
        import grpc.aio  # type: ignore[import-untyped]

        return grpc.aio.EOF

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for task in asyncio.all_tasks(self._loop):
                if task is not asyncio.current_task():
                    task.cancel()
            for channel, _ in self._channels.values():
                await channel.close()

        with contextlib.suppress(Exception):  # closing is best effort
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(2)
        self._loop.call_soon_threadsafe(self._loop.stop)
