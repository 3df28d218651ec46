"""Fan datapath events out to every `cellgate monitor` client without ever blocking the reader."""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class EventHub:
    """Publish/subscribe with bounded queues: a slow client loses events, never stalls others."""

    def __init__(self, backlog: int = 256, queue_size: int = 4096) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[queue.Queue[dict[str, Any]]] = []
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=backlog)
        self.published = 0
        self.lost = 0
        self._queue_size = queue_size

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.published += 1
            self.recent.append(event)
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(event)
            except queue.Full:
                with self._lock:
                    self.lost += 1

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=self._queue_size)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def stream(
        self, accept: Callable[[dict[str, Any]], bool], heartbeat: float = 2.0
    ) -> Iterator[dict[str, Any] | None]:
        """Events that `accept` lets through; None every `heartbeat` seconds of silence."""
        q = self.subscribe()
        try:
            while True:
                try:
                    event = q.get(timeout=heartbeat)
                except queue.Empty:
                    yield None
                    continue
                if accept(event):
                    yield event
        finally:
            self.unsubscribe(q)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)
