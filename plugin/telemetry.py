"""What the use cases count for the metrics: plain counters and histograms, no exposition format
(plugin.observe.metrics turns them into Prometheus metrics at scrape time). Standard library only."""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

# Prometheus' default buckets (seconds)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # the last is +Inf
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*[repr(b) for b in BUCKETS], "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Telemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: collections.Counter[tuple[str, Labels]] = collections.Counter()
        self._histograms: dict[tuple[str, Labels], Histogram] = {}

    def count(self, name: str, n: int = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += n

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        with self._lock:
            key = (name, tuple(sorted(labels.items())))
            self._histograms.setdefault(key, Histogram()).observe(seconds)

    def counters(self, name: str) -> Iterator[tuple[dict[str, str], int]]:
        with self._lock:
            found = [(dict(labels), n) for (metric, labels), n in self._counters.items() if metric == name]
        yield from found

    def histograms(self, name: str) -> Iterator[tuple[dict[str, str], Histogram]]:
        with self._lock:
            found = [(dict(labels), Histogram(list(h.counts), h.total))
                     for (metric, labels), h in self._histograms.items() if metric == name]
        yield from found
