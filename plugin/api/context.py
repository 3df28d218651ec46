"""What the REST blueprints share: the use cases they call and the bounds of long requests.

Built once by plugin.api.app.create_app and kept in the app (`current_app.extensions`);
a blueprint reads it with `ctx()`. Nothing here reaches into the Agent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import current_app
from werkzeug.exceptions import ServiceUnavailable

from plugin.monitor import EventHub
from plugin.observe.flowlog import FlowLog
from plugin.service import Agent
from plugin.service.cni import CniService

if TYPE_CHECKING:
    from plugin.service.cluster import ClusterService

# Long-lived requests each hold one of the socket's request workers (plugin/server.py, 64) for
# as long as they last; past these bounds they are refused (503), so the other calls always
# find at least half of the workers free.
MAX_STREAMS = 16  # monitor streams (and later flow streams) open at once
MAX_WAITS = 16  # policy waits at once


class Tracers:
    """Some events cost; the datapath emits them only while a monitor asks for them."""

    def __init__(self, switch: Callable[[bool], None]) -> None:
        self._switch = switch
        self._count = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def hold(self, seconds: float) -> None:
        """Keep the events on for `seconds` from now (renewed by every call): a page that polls."""
        with self._lock:
            timer, self._timer = self._timer, threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        if timer is None:
            self.start()
        else:
            timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._timer is None or self._timer.is_alive():
                return  # renewed meanwhile
            self._timer = None
        self.stop()

    def start(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1:
                self._switch(True)

    def stop(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self._switch(False)


class Slots:
    """At most `limit` requests of one long-lived kind at a time; past it, 503 at once."""

    def __init__(self, what: str, limit: int) -> None:
        self._what = what
        self._limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None]:
        """A slot, or ServiceUnavailable; returns the function that gives it back (once)."""
        with self._lock:
            if self._used >= self._limit:
                raise ServiceUnavailable(f"{self._limit} {self._what} are open already; try again later")
            self._used += 1
        given_back = threading.Event()

        def release() -> None:
            with self._lock:
                if not given_back.is_set():
                    given_back.set()
                    self._used -= 1

        return release

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        release = self.take()
        try:
            yield
        finally:
            release()


@dataclass
class ApiContext:
    agent: Agent
    hub: EventHub
    info: Callable[[], dict[str, Any]]
    cni: CniService | None
    tracers: Tracers
    verdicts: Tracers  # allowed new flows: every monitor but drop-only ones
    streams: Slots
    waits: Slots
    flows: FlowLog
    cluster: ClusterService | None = None

    @classmethod
    def build(cls, agent: Agent, hub: EventHub, info: Callable[[], dict[str, Any]],
              cni: CniService | None, cluster: ClusterService | None = None,
              flows: FlowLog | None = None, verdicts: Tracers | None = None) -> ApiContext:
        return cls(agent, hub, info, cni, Tracers(agent.set_trace),
                   verdicts if verdicts is not None else Tracers(agent.set_verdicts),
                   Slots("monitor and flow streams", MAX_STREAMS), Slots("policy waits", MAX_WAITS),
                   flows if flows is not None else FlowLog(), cluster)


KEY = "cellgate"


def ctx() -> ApiContext:
    context: ApiContext = current_app.extensions[KEY]
    return context
