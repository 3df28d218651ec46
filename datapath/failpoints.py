"""Named crash and error points for tests: CELLGATE_FAILPOINTS=name=action[,name=action].

Actions: `error` raises KernelError (the operation fails and must roll back), `exit`
kills the process on the spot (as SIGKILL would). Unset, every point is a no-op.
Standard library only, so every layer down to the kernel adapter may mark its points.
"""

from __future__ import annotations

import logging
import os

from datapath.errors import KernelError

log = logging.getLogger(__name__)


def hit(name: str) -> None:
    spec = os.environ.get("CELLGATE_FAILPOINTS", "")
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.partition("=")
        if point.strip() != name:
            continue
        log.warning("failpoint %s: %s", name, action or "error")
        if action == "exit":
            os._exit(137)
        raise KernelError(f"failpoint {name}")
