"""The document-store port (`DocumentStore`) and its in-memory fake. Standard library only.

Every package keeps its persisted documents behind this port; the file-backed adapter
(`ipam.store.JsonDir`) lives above the floor. Imports nothing of ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol


class DocumentStore(Protocol):
    """Where a component keeps its documents; the file-backed and in-memory ones behave alike."""

    def put(self, key: str, doc: dict[str, Any]) -> None: ...

    def delete(self, key: str) -> None: ...

    def load(self) -> Iterator[tuple[str, dict[str, Any]]]: ...


class MemoryStore:
    """In-memory DocumentStore for tests and dry runs."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.fail_next: Exception | None = None  # raised by the next put (a full disk)
        self.fail_next_delete: Exception | None = None  # raised by the next delete (a read-only state dir)

    def put(self, key: str, doc: dict[str, Any]) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.docs[key] = json.loads(json.dumps(doc))

    def delete(self, key: str) -> None:
        if self.fail_next_delete is not None:
            exc, self.fail_next_delete = self.fail_next_delete, None
            raise exc
        self.docs.pop(key, None)

    def load(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, doc in sorted(self.docs.items()):
            yield key, json.loads(json.dumps(doc))
