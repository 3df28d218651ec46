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
