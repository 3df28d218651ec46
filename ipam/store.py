"""A directory of JSON documents written atomically (temp file, fsync, rename, fsync dir), or
made durable through a Journal shared by the agent's directories: one fsync per write.

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
import struct
import threading
import time
import zlib
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


def _replace(path: Path, data: bytes | None) -> None:
    """Put `data` at `path` (None: remove it), atomically but not durably: the journal is."""
    if data is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RECORD = struct.Struct("<II")  # payload length, CRC-32 of the payload


def _syncfs(fd: int) -> int:
    """syncfs(2) of the filesystem holding `fd`: 0, or -1 where there is none."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syncfs(fd))
    except (OSError, AttributeError):
        return -1


class Journal:
    """Write-ahead log of document writes under one directory: a write is one record appended and
    fsynced, then the document file replaced without an fsync of its own (half the fsyncs of
    write_atomic, which also syncs the directory). Past `checkpoint_bytes` the files written
    since the last checkpoint are synced (syncfs of the state dir's filesystem; nothing is kept
    per file, so the journal's memory does not grow with the documents) and the log is emptied.

    `replay` (at start, before any directory is read) applies what the log holds, oldest first,
    durably, and empties it; a torn last record (a crash while appending) was never acknowledged
    and is dropped. A record whose file cannot be written is taken back out of the log, so a
    write the caller saw fail never comes back at the next start."""

    def __init__(self, directory: Path, checkpoint_bytes: int = 4 << 20) -> None:
        self.directory = directory
        self.path = directory / "journal"
        self.checkpoint_bytes = checkpoint_bytes
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._checkpointing = False

    def _name(self, path: Path) -> str:
        return str(path.relative_to(self.directory))

    def replay(self) -> int:
        """Apply the log's records to the files; how many there were."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StateError(f"cannot read the state journal {self.path}: {exc.strerror or exc}") from exc
        count, at = 0, 0
        while at + _RECORD.size <= len(raw):
            length, crc = _RECORD.unpack_from(raw, at)
            payload = raw[at + _RECORD.size:at + _RECORD.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("state journal: dropped a torn record at byte %d (never acknowledged)", at)
                break
            name, _, data = payload[1:].partition(b"\0")
            target = (self.directory / name.decode()).resolve()
            if not target.is_relative_to(self.directory.resolve()) or payload[:1] not in (b"P", b"X"):
                raise StateError(f"state journal record at byte {at} is not ours: {payload[:80]!r}")
            try:
                if payload[:1] == b"X":
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                    _fsync(target.parent)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    write_atomic(target, data)
            except OSError as exc:
                raise StateError(f"cannot replay the state journal into {target}: {exc.strerror or exc}") from exc
            count += 1
            at += _RECORD.size + length
        try:
            os.truncate(self.path, 0)
            _fsync(self.path)
        except OSError as exc:
            raise StateError(f"cannot empty the state journal {self.path}: {exc.strerror or exc}") from exc
        if count:
            log.info("state journal: %d writes replayed", count)
        return count

    def write(self, path: Path, data: bytes | None) -> None:
        """Make `data` the content of `path` (None: remove it), durably, before returning."""
        # a record: P (put) or X (remove), the path under the directory, NUL, the document
        payload = (b"X" if data is None else b"P") + self._name(path).encode() + b"\0" + (data or b"")
        record = _RECORD.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            try:
                if self._fd < 0:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    self._size = os.fstat(self._fd).st_size
                start = self._size
            except OSError as exc:
                raise StateError(f"cannot persist {path.name}: {exc.strerror or exc}") from exc
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
                self._size = start + len(record)
                _replace(path, data)
            except OSError as exc:
                self._take_back(start)
                raise StateError(f"cannot persist {path.name}: {exc.strerror or exc}") from exc
            if self._size > self.checkpoint_bytes and not self._checkpointing:
                self._checkpointing = True  # off the caller's path: its write is durable already
                threading.Thread(target=self._background_checkpoint, name="journal-checkpoint", daemon=True).start()

    def _background_checkpoint(self) -> None:
        with self._lock:
            self._checkpointing = False
            if self._fd >= 0 and self._size > self.checkpoint_bytes:
                self._checkpoint()

    def _take_back(self, start: int) -> None:
        try:
            os.ftruncate(self._fd, start)
            os.fsync(self._fd)
            self._size = start
        except OSError as exc:  # the record may come back at the next start: say so
            log.error("state journal: cannot take back a failed write: %s", exc)

    def _checkpoint(self) -> None:
        try:
            if _syncfs(self._fd) != 0:  # every file and directory of the state dir's filesystem
                os.sync()
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        except OSError as exc:  # the log stays as it is: nothing is lost, the next one tries again
            log.warning("state journal: checkpoint failed: %s", exc)
            return
        self._size = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._checkpoint()
                os.close(self._fd)
                self._fd = -1


class JsonDir:
    """Documents as files in one directory; every put is durable before it returns (through the
    journal when there is one)."""

    def __init__(self, directory: Path, journal: Journal | None = None) -> None:
        self.directory = directory
        self.journal = journal
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def put(self, key: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if self.journal is not None:
            self.journal.write(self.directory / file_name(key), data)
        else:
            write_atomic(self.directory / file_name(key), data)

    def delete(self, key: str) -> None:
        if self.journal is not None:
            if (self.directory / file_name(key)).exists():
                self.journal.write(self.directory / file_name(key), None)
            return
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
