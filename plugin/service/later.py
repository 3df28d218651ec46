"""Work a use case hands on to run after its reply (a removed endpoint's veth): one thread, in
order. Imports only the standard library.

The thread starts with the agent, so it is one of the agent's threads from the beginning, never
a thread per job. A job that fails is logged; the job itself says what is left for later.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Later:
    def __init__(self, name: str = "cg-later") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, job: Callable[[], None]) -> None:
        """Run `job` after everything submitted before it."""
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job's bug must not end the thread that runs the next ones
                log.exception("deferred job")

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every job submitted so far ran; False if that took longer than `timeout`."""
        done = threading.Event()
        self._jobs.put(done.set)
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
