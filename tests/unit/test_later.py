"""plugin.service.later: work after the reply runs in order on one thread, and a failing job does
not stop the ones after it."""

from __future__ import annotations

import threading

from plugin.service.later import Later


def test_jobs_run_in_order_on_one_thread_past_a_failing_one() -> None:
    later = Later("cgtest-later")
    ran: list[tuple[int, str]] = []

    def job(i: int) -> None:
        ran.append((i, threading.current_thread().name))
        if i == 1:
            raise RuntimeError("a bug in a job")

    for i in range(4):
        later(lambda i=i: job(i))
    assert later.drain()
    assert ran == [(i, "cgtest-later") for i in range(4)]
    later(lambda: job(9))
    later.stop()
    assert ran[-1] == (9, "cgtest-later")  # stop runs what was queued first
