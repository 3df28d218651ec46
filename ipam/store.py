"""A directory of JSON documents written atomically (temp file, fsync, rename, fsync dir).

The file adapter of the floor's port (datapath.store.DocumentStore); standard library and
datapath only. A document that cannot be read back is moved aside as `<name>.corrupt-<time>`
and reported, never allowed to stop the agent from starting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datapath.errors import StateError

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_name(key: str) -> str:
    """Map a key (pool ID, endpoint ID) to a file name that cannot escape the directory."""
    name = _SAFE.sub("_", key)
    if not name or name.startswith("."):
        name = "_" + name
    return name + ".json"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot persist {path.name}: {exc.strerror or exc}") from exc


class JsonDir:
    """Documents as files in one directory; every put is durable before it returns."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def put(self, key: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        write_atomic(self.directory / file_name(key), data)

    def delete(self, key: str) -> None:
        try:
            (self.directory / file_name(key)).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot delete {key}: {exc.strerror or exc}") from exc

    def load(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # an interrupted write; the old file stands
                continue
            if path.suffix != ".json" or path.name.startswith("."):
                continue
            try:
                doc = json.loads(path.read_bytes())
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                log.warning("state file %s is unreadable (%s); moved to %s", path, exc, aside.name)
                path.rename(aside)
                continue
            yield path.stem, doc
