"""The production FlowSource: the datapath's conntrack entry of a redirected connection (through
datapath.kernel.proxymap) and the L7 filters the agent published (plugin/service/l7filters.py),
re-read when an entry names a number this process does not know yet.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from datapath.errors import CellgateError
from datapath.policy.l7 import L7Filter
from plugin.proxy.flows import Address, Flow

log = logging.getLogger(__name__)
DENY_ALL_HTTP = L7Filter("http", ())  # a number nobody published: every request denied (fail closed)


class KernelFlowSource:
    def __init__(self, pin_dir: Path, filters: Path) -> None:
        from datapath.kernel import proxymap  # the proxy process's kernel adapter, made here, not at import

        self.conntrack = proxymap.ConntrackReader(pin_dir)
        self._mark = proxymap.mark_for
        self.path = filters
        self.filters: dict[int, L7Filter] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            self.filters = {int(n): L7Filter.from_json(raw) for n, raw in data.get("filters", {}).items()}
            self._stamp = stamp
        except (OSError, ValueError, CellgateError) as exc:
            log.error("cannot read the L7 filters in %s (keeping the previous ones): %s", self.path, exc)

    def _filter(self, number: int) -> L7Filter | None:
        if not number:
            return None
        found = self.filters.get(number)
        if found is None:
            self.reload()
            found = self.filters.get(number)
        if found is None:
            log.error("conntrack names L7 filter %d, which the agent has not published: denying", number)
            return DENY_ALL_HTTP
        return found

    def lookup(self, client: Address, original: Address) -> Flow | None:
        entry = self.conntrack.lookup(client, original)
        if entry is None:
            return None
        return Flow(client, original, entry.src_identity, entry.dst_identity,
                    self._filter(entry.l7_egress), self._filter(entry.l7_ingress), self._mark(entry.src_identity))
