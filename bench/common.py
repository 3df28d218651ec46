"""Shared pieces of the benchmark tiers: names, undo stack with signal handling, stats, results.

Everything a run creates is named `cgb` + a random tag and registered on a Cleanup, which
undoes it in reverse order in `finally` and on SIGINT/SIGTERM. No sleeps as
synchronisation: `wait_until` polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREFIX = "cgb"


def new_tag() -> str:
    """`cgb` + 5 hex characters: short enough that tag + 7 more fit in an interface name."""
    return PREFIX + secrets.token_hex(3)[:5]


def run(*cmd: str, check: bool = True, timeout: float = 120, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input, env=env,
                          check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:300]} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    """Poll `cond` until it returns something true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # the condition may fail until the thing exists
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last})" if last else ""))
        time.sleep(every)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind through every `finally`."""


class Cleanup:
    """A stack of undo actions, run in reverse in `close()`; each failure is logged, none raised.

    As a context manager it turns SIGINT and SIGTERM into `Interrupted`, so an interrupted
    run still unwinds through the `finally` blocks that remove what it made; while the undo
    actions run, further signals are ignored so cleanup is never cut short.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], Any]]] = []
        self._old: dict[int, Any] = {}

    def push(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._undo.append((what, lambda: fn(*args, **kwargs)))

    def close(self) -> None:
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._undo:
                what, fn = self._undo.pop()
                try:
                    fn()
                except Exception as exc:
                    log.warning("cleanup: %s: %s", what, exc)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    def __enter__(self) -> Cleanup:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)


# -- statistics ------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sequence."""
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, IQR, p95, min, max of a sample."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "q1": quantile(values, 0.25),
        "q3": quantile(values, 0.75),
        "p95": quantile(values, 0.95),
        "min": min(values),
        "max": max(values),
    }


# -- machine and results ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "vcpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()}
    for key, cmd in (("iptables", ("iptables", "--version")), ("dockerd", ("dockerd", "--version"))):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info[key] = run(*cmd, check=False, timeout=10).stdout.strip()
    with contextlib.suppress(Exception):
        import importlib.metadata

        info["bcc"] = importlib.metadata.version("bcc")
    return info


def run_dir(run_id: str) -> Path:
    path = RESULTS / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S")


def write_raw(run_id: str, name: str, payload: dict[str, Any]) -> Path:
    """One tier's (or chunk's) raw samples, next to the others of the same run."""
    path = run_dir(run_id) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.rename(path)
    log.info("wrote %s", path)
    return path


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        log.info("%s took %.1f s", label, time.monotonic() - started)
