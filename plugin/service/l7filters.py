"""The L7 filters of the policy map: the kernel's entries carry a filter's number, the proxy
reads its rules from one JSON file that this table replaces atomically (new filters are written
before the entries that use them, unused ones dropped after). Numbers are kept across restarts
(the file is read back), so entries read from pinned maps still name the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from datapath.errors import CellgateError
from datapath.policy.compile import Entries
from datapath.policy.l7 import L7Filter

log = logging.getLogger(__name__)
MAX_ID = 0xFFFF


class FilterTable:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.by_id: dict[int, L7Filter] = {}
        self.ids: dict[L7Filter, int] = {}
        self._next = 1
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        """All of the file or nothing: a filter numbered 0 (no filter in the kernel: every request
        passes) or out of range would open what it names, a half-read table would lie."""
        try:
            data = json.loads(path.read_text())
            raw_filters = data.get("filters", {}) if isinstance(data, dict) else None
            if not isinstance(raw_filters, dict):
                raise ValueError("not an object with next and filters")
            by_id: dict[int, L7Filter] = {}
            for text, raw in raw_filters.items():
                number = int(text)
                if not 1 <= number <= MAX_ID:
                    raise ValueError(f"filter number {text} is not in 1..{MAX_ID}")
                by_id[number] = L7Filter.from_json(raw)
            next_id = data.get("next", max(by_id, default=0) % MAX_ID + 1)
            if isinstance(next_id, bool) or not isinstance(next_id, int) or not 1 <= next_id <= MAX_ID:
                raise ValueError(f"next {next_id!r} is not a number in 1..{MAX_ID}")
        except (OSError, ValueError, CellgateError) as exc:
            # Fail closed: entries naming unknown filters deny every request in the proxy.
            log.error("cannot read the L7 filters in %s (starting empty): %s", path, exc)
            return
        self.by_id = by_id
        for number, f in sorted(by_id.items()):
            self.ids.setdefault(f, number)
        self._next = next_id

    def number(self, entries: Entries) -> Entries:
        """`entries` with every filter numbered (new filters get a free number); the same dict when
        no entry has one (L3/L4-only policy pays one pass, no copy)."""
        if not any(v.filter is not None for v in entries.values()):
            return entries
        out: Entries = {}
        for key, value in entries.items():
            out[key] = value if value.filter is None else dataclasses.replace(value, l7=self._id(value.filter))
        return out

    def _id(self, f: L7Filter) -> int:
        found = self.ids.get(f)
        if found is not None:
            return found
        for _ in range(MAX_ID):
            candidate, self._next = self._next, self._next % MAX_ID + 1
            if candidate not in self.by_id:
                self.by_id[candidate] = f
                self.ids[f] = candidate
                return candidate
        raise CellgateError(f"more than {MAX_ID} distinct L7 filters")

    def retire(self, in_use: set[int]) -> bool:
        """Forget the filters no entry uses any more; True if any went."""
        gone = [n for n in self.by_id if n not in in_use]
        for n in gone:
            f = self.by_id.pop(n)
            if self.ids.get(f) == n:
                del self.ids[f]
        return bool(gone)

    def document(self) -> dict[str, Any]:
        return {"next": self._next, "filters": {str(n): f.to_json() for n, f in sorted(self.by_id.items())}}

    def publish(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(self.document(), fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
