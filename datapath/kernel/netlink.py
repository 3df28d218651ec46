"""A pyroute2 IPRoute confined to one thread of its own, renewed every few hundred calls.

pyroute2's synchronous IPRoute keeps state that only close() frees, so a long-lived one grows:
- per thread that uses it: the thread that made it keeps an event loop, a message queue and a
  socket; every other thread gets a fresh event loop and transport for each call, and tearing
  that transport down queues an ECONNRESET message (and records the loop in status['eids'])
  that nothing reads, about 150 bytes per call, plus a netlink socket per thread;
- per request answered with data and an ACK (`link("get")`, `route("get")`): the ACK arrives
  after the request's queue is gone and stays in the socket's root queue, about 100 bytes.
The agent calls the kernel from its request threads, so every call runs in the one thread that
owns the socket, and the socket is closed and made again after RENEW_AFTER calls, which bounds
what it can hold. Imports only pyroute2 and the standard library.
"""

from __future__ import annotations

import errno
import functools
import queue
import threading
import types
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pyroute2 import IPRoute

RENEW_AFTER = 256  # calls on one IPRoute before it is closed and made again (~1 ms)
_Job = tuple[str, tuple[Any, ...], dict[str, Any], "Future[Any]"]


def _materialized(result: Any) -> Any:
    """A dump pyroute2 returns as a generator is read where the socket lives."""
    return tuple(result) if isinstance(result, types.GeneratorType) else result


class ConfinedIPRoute:
    """The IPRoute API (`link`, `addr`, `route`, `tc`, `get_links`, ...) over an IPRoute that
    only its own thread touches. Calls are served one at a time, in order; a dump comes back
    as a tuple, an error is raised in the caller. Nothing lives from one call to the next but
    the socket (no bind, no multicast groups), so renewing it changes nothing a caller sees."""

    def __init__(
        self, factory: Callable[[], Any] = IPRoute, name: str = "netlink", renew_after: int = RENEW_AFTER
    ) -> None:
        self.renewed = 0  # how many times the IPRoute was closed and made again
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # no call is queued behind close()'s end mark
        made: Future[Any] = Future()
        self._thread = threading.Thread(target=self._serve, args=(factory, made, renew_after), name=name, daemon=True)
        self._ipr: Any = None
        self._thread.start()
        made.result()  # what IPRoute() raised, raised here

    def _serve(self, factory: Callable[[], Any], made: Future[Any], renew_after: int) -> None:
        try:
            self._ipr = factory()
        except BaseException as exc:  # handed to the constructor's caller
            made.set_exception(exc)
            return
        made.set_result(self._ipr)
        served = 0
        try:
            while (job := self._jobs.get()) is not None:
                method, args, kwargs, done = job
                try:
                    if self._ipr is None or served >= renew_after:
                        self._renew(factory)
                        served = 0
                    served += 1
                    done.set_result(_materialized(getattr(self._ipr, method)(*args, **kwargs)))
                except BaseException as exc:  # the caller's to handle; a failed renewal is retried next call
                    done.set_exception(exc)
        finally:
            if self._ipr is not None:
                self._ipr.close()

    def _renew(self, factory: Callable[[], Any]) -> None:
        old, self._ipr = self._ipr, None
        if old is not None:
            old.close()
        self._ipr = factory()
        self.renewed += 1

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is self._thread:
            return _materialized(getattr(self._ipr, method)(*args, **kwargs))
        done: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the netlink socket is closed")
            self._jobs.put((method, args, kwargs, done))
        return done.result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def close(self) -> None:
        """Close the socket with all its pyroute2 state, in its own thread; waits for calls queued before."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> ConfinedIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
