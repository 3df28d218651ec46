"""ipam.store: JsonDir writes atomically, survives bad files, and keeps keys inside its directory."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from datapath.errors import StateError
from datapath.store import MemoryStore
from ipam.store import JsonDir, file_name, write_atomic


def test_put_load_delete_round_trip(tmp_path: Path) -> None:
    store = JsonDir(tmp_path / "ipam")
    store.put("CellgateLocal/10.1.0.0/24", {"id": "CellgateLocal/10.1.0.0/24", "n": 1})
    store.put("b", {"n": 2})
    store.put("b", {"n": 3})  # replaced, not duplicated
    assert [doc for _, doc in store.load()] == [{"id": "CellgateLocal/10.1.0.0/24", "n": 1}, {"n": 3}]
    store.delete("b")
    store.delete("b")  # deleting what is gone succeeds
    store.delete("never-existed")
    assert [doc for _, doc in store.load()] == [{"id": "CellgateLocal/10.1.0.0/24", "n": 1}]


def test_directory_is_private(tmp_path: Path) -> None:
    JsonDir(tmp_path / "state")
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0


def test_atomic_write_leaves_only_the_document(tmp_path: Path) -> None:
    store = JsonDir(tmp_path)
    for i in range(5):
        store.put("key", {"i": i})
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]
    assert json.loads((tmp_path / "key.json").read_bytes()) == {"i": 4}
    assert (tmp_path / "key.json").stat().st_mode & 0o777 == 0o600


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JsonDir(tmp_path)
    store.put("doc", {"old": True})

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StateError, match=r"cannot persist doc\.json: No space left"):
        store.put("doc", {"new": True})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]
    assert list(store.load()) == [("doc", {"old": True})]


def test_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "doc.json").mkdir()  # something that cannot be replaced by a file
    (tmp_path / "doc.json" / "keep").write_text("x")
    with pytest.raises(StateError):
        write_atomic(tmp_path / "doc.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_corrupt_documents_are_moved_aside_and_skipped(tmp_path: Path) -> None:
    store = JsonDir(tmp_path)
    store.put("good", {"ok": True})
    (tmp_path / "truncated.json").write_text('{"id": "x", "allocat')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    assert list(store.load()) == [("good", {"ok": True})]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "good.json" in names
    for bad in ("truncated.json", "list.json", "binary.json"):
        assert bad not in names
        assert any(n.startswith(bad + ".corrupt-") for n in names), names
    assert list(store.load()) == [("good", {"ok": True})]  # the aside files are not read again


def test_leftover_temp_files_are_deleted_on_load(tmp_path: Path) -> None:
    store = JsonDir(tmp_path)
    store.put("pool", {"v": 1})
    (tmp_path / ".pool.json.1234.5678.tmp").write_text('{"v": 2')  # a crash mid-write
    (tmp_path / "README").write_text("not a document")
    assert list(store.load()) == [("pool", {"v": 1})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "pool.json"]


@pytest.mark.parametrize(
    "key",
    ["../escape", "../../etc/passwd", "a/../../b", "/abs/path", "..", ".", "", ".hidden", "x\0y", "sp ace/é"],
)
def test_file_name_cannot_escape_the_directory(tmp_path: Path, key: str) -> None:
    name = file_name(key)
    assert "/" not in name and "\0" not in name
    assert not name.startswith(".")
    assert name.endswith(".json")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    store = JsonDir(tmp_path / "docs")
    store.put(key, {"key": key})
    assert [doc for _, doc in store.load()] == [{"key": key}]
    assert os.listdir(tmp_path) == ["docs"]


def test_file_name_keeps_docker_pool_ids_readable() -> None:
    assert file_name("CellgateLocal/10.1.0.0/24") == "CellgateLocal_10.1.0.0_24.json"
    assert file_name("a" * 64) == "a" * 64 + ".json"


def test_memory_store_copies_documents_and_fails_once() -> None:
    store = MemoryStore()
    doc = {"list": [1]}
    store.put("k", doc)
    doc["list"].append(2)
    assert store.docs["k"] == {"list": [1]}
    store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        store.put("k", {"list": []})
    assert store.docs["k"] == {"list": [1]}
    store.put("k", {"list": []})
    assert list(store.load()) == [("k", {"list": []})]


# -- the journal: one fsync per write, replayed after a crash --------------------------------


def test_journal_writes_are_files_at_once_and_one_record_each(tmp_path: Path) -> None:
    from ipam.store import Journal

    journal = Journal(tmp_path)
    docs = JsonDir(tmp_path / "endpoints", journal)
    docs.put("a", {"n": 1})
    docs.put("b", {"n": 2})
    docs.delete("a")
    docs.delete("never")  # nothing there: no record
    assert dict(docs.load()) == {"b": {"n": 2}}
    raw = (tmp_path / "journal").read_bytes()
    assert raw.count(b"endpoints/") == 3
    journal.close()  # a checkpoint: the files are synced, the log emptied
    assert (tmp_path / "journal").read_bytes() == b""


def test_journal_replay_restores_what_the_files_lost(tmp_path: Path) -> None:
    """A power cut after the log's fsync and before the file reached the disk: the next start
    rebuilds the file from the log."""
    from ipam.store import Journal

    journal = Journal(tmp_path)
    docs = JsonDir(tmp_path / "ipam", journal)
    docs.put("pool", {"v": 1})
    docs.put("pool", {"v": 2})
    docs.put("gone", {"v": 0})
    docs.delete("gone")
    (tmp_path / "ipam" / "pool.json").write_bytes(b'{"v": 1}')  # the older content on disk
    (tmp_path / "ipam" / "gone.json").write_bytes(b"{}")  # the remove was lost too
    os.close(journal._fd)  # the crash: no close, no checkpoint
    assert Journal(tmp_path).replay() == 4
    assert dict(JsonDir(tmp_path / "ipam").load()) == {"pool": {"v": 2}}
    assert (tmp_path / "journal").read_bytes() == b""
    assert Journal(tmp_path).replay() == 0  # replaying twice changes nothing


def test_journal_drops_a_torn_last_record(tmp_path: Path) -> None:
    from ipam.store import Journal

    journal = Journal(tmp_path)
    JsonDir(tmp_path / "d", journal).put("x", {"ok": True})
    os.close(journal._fd)
    with (tmp_path / "journal").open("ab") as fh:  # a crash in the middle of the next append
        fh.write(b"\x40\x00\x00\x00\x01\x02")
    assert Journal(tmp_path).replay() == 1
    assert dict(JsonDir(tmp_path / "d").load()) == {"x": {"ok": True}}


def test_a_write_that_fails_after_its_record_is_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller sees the write fail, so the next start must not bring it back."""
    from ipam import store

    journal = store.Journal(tmp_path)
    docs = JsonDir(tmp_path / "d", journal)
    docs.put("x", {"v": 1})

    def no_space(path: Path, data: bytes | None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_replace", no_space)
    with pytest.raises(StateError, match="No space left"):
        docs.put("x", {"v": 2})
    monkeypatch.undo()
    os.close(journal._fd)
    store.Journal(tmp_path).replay()
    assert dict(JsonDir(tmp_path / "d").load()) == {"x": {"v": 1}}


def test_journal_records_cannot_name_files_outside_the_state_dir(tmp_path: Path) -> None:
    import struct
    import zlib

    from ipam.store import Journal

    payload = b"P../outside.json\0{}"
    (tmp_path / "journal").write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    with pytest.raises(StateError, match="not ours"):
        Journal(tmp_path).replay()
    assert not (tmp_path.parent / "outside.json").exists()


def test_a_full_journal_is_checkpointed(tmp_path: Path) -> None:
    from ipam.store import Journal

    journal = Journal(tmp_path, checkpoint_bytes=200)
    docs = JsonDir(tmp_path / "d", journal)
    for i in range(20):
        docs.put(f"k{i}", {"i": i, "pad": "x" * 20})
    assert (tmp_path / "journal").stat().st_size <= 200 + 100
    assert len(dict(docs.load())) == 20
