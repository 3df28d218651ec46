"""What the real servers tests start (etcd, the Tansu broker) share: their process, its PID, and
`with` to start and stop them. Standard library only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from types import TracebackType
from typing import Any


class ServerProcess:
    """A server run as a child process; subclasses define start() and stop()."""

    proc: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def end(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process, wait for it, SIGKILL it if it outlives 10 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
