"""The bpf(2) syscall through ctypes, for what BCC does not wrap: the sizes of a pinned map
(the loader's layout check), BPF_PROG_TEST_RUN (the micro benchmark), the maps of a program,
and element and batch operations on pinned maps (datapath.kernel.tables, which serves an
agent that reuses its pinned programs without BCC).

Standard library only. x86-64 and arm64 syscall numbers; root (CAP_BPF + CAP_NET_ADMIN).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_MAP_LOOKUP_ELEM, BPF_OBJ_GET, BPF_PROG_TEST_RUN, BPF_OBJ_GET_INFO_BY_FD = 1, 7, 10, 15
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = int(_libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):  # the head of struct bpf_map_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


@dataclass(frozen=True)
class MapShape:
    type: int
    key_size: int
    value_size: int
    max_entries: int


def open_pinned(path: str) -> int:
    """A file descriptor of the object pinned at `path` (OSError if there is none)."""
    raw = os.fsencode(path) + b"\0"
    name = ctypes.create_string_buffer(raw, len(raw))
    get = _ObjGetAttr(pathname=ctypes.addressof(name))
    return _bpf(BPF_OBJ_GET, get, f"BPF_OBJ_GET {path}")


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class MapReader:
    """Lookups in one pinned map by raw key bytes, reusing its buffers (one syscall each)."""

    def __init__(self, path: str, value_size: int) -> None:
        self.fd = open_pinned(path)
        self.value = ctypes.create_string_buffer(value_size)
        self._attr = _ElemAttr(map_fd=self.fd, value=ctypes.addressof(self.value))

    def lookup(self, key: ctypes.Structure) -> bytes | None:
        self._attr.key = ctypes.addressof(key)
        ret = int(_libc.syscall(_SYS_BPF, BPF_MAP_LOOKUP_ELEM, ctypes.byref(self._attr), ctypes.sizeof(self._attr)))
        if ret < 0:
            err = ctypes.get_errno()
            if err == 2:  # ENOENT
                return None
            raise OSError(err, f"BPF_MAP_LOOKUP_ELEM: {os.strerror(err)}")
        return self.value.raw

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pinned_map_shape(path: str) -> MapShape:
    """Type and sizes of the map pinned at `path` (OSError if there is none)."""
    fd = open_pinned(path)
    try:
        info = _MapInfo()
        attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD {path}")
        return MapShape(info.type, info.key_size, info.value_size, info.max_entries)
    finally:
        os.close(fd)


class _TestAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRun:
    retval: int  # the program's return value (a tc action for SCHED_CLS)
    duration_ns: int  # kernel-measured mean time per repetition


class ProgTester:
    """Runs one program on one packet, reusing the buffers between calls."""

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self._attr = _TestAttr()
        self._in = ctypes.create_string_buffer(0)

    def run(self, packet: bytes, repeat: int = 1) -> TestRun:
        if len(self._in.raw) != len(packet):
            self._in = ctypes.create_string_buffer(len(packet))
        ctypes.memmove(self._in, packet, len(packet))
        attr = self._attr
        ctypes.memset(ctypes.byref(attr), 0, ctypes.sizeof(attr))
        attr.prog_fd = self.prog_fd
        attr.data_in = ctypes.addressof(self._in)
        attr.data_size_in = len(packet)
        attr.repeat = repeat
        _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
        return TestRun(attr.retval, attr.duration)


# -- cgroup programs: attach, detach, query, pin ---------------------------------------------

BPF_OBJ_PIN, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_QUERY = 6, 8, 9, 16
BPF_F_ALLOW_MULTI = 2


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("prog_attach_flags", ctypes.c_uint64)]


class _ProgInfo(ctypes.Structure):  # the head of struct bpf_prog_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64)]


def prog_attach(cgroup_fd: int, prog_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    attr = _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags)
    _bpf(BPF_PROG_ATTACH, attr, "BPF_PROG_ATTACH")


def prog_detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _bpf(BPF_PROG_DETACH, attr, "BPF_PROG_DETACH")


def attached_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to the cgroup at `attach_type` (not inherited ones)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=cgroup_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=64)
    _bpf(BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
    return list(ids[: attr.prog_cnt])


def prog_id(prog_fd: int) -> int:
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return int(info.id)


def obj_pin(fd: int, path: str) -> None:
    raw = os.fsencode(path) + b"\0"
    name = ctypes.create_string_buffer(raw, len(raw))
    _bpf(BPF_OBJ_PIN, _ObjGetAttr(pathname=ctypes.addressof(name), bpf_fd=fd), f"BPF_OBJ_PIN {path}")


def prog_map_ids(prog_fd: int) -> list[int]:
    """The ids of the maps a loaded program uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return list(ids[: min(info.nr_map_ids, len(ids))])


def map_info(fd: int) -> tuple[int, MapShape]:
    """(id, shape) of an open map."""
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return int(info.id), MapShape(info.type, info.key_size, info.value_size, info.max_entries)


# -- map elements ----------------------------------------------------------------------------

BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 2, 3, 4
BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 26, 27
ENOENT = 2


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _elem(cmd: int, fd: int, key: int, value: int, flags: int = 0) -> int:
    """One element call; 0, or -errno (ENOENT and the like are the caller's to judge)."""
    attr = _ElemAttr(map_fd=fd, key=key, value=value, flags=flags)
    ret = int(_libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    return -ctypes.get_errno() if ret < 0 else 0


def map_lookup(fd: int, key: int, value: int) -> bool:
    """Copy the value at the key's address to `value`; False if there is none."""
    err = _elem(BPF_MAP_LOOKUP_ELEM, fd, key, value)
    if err == -ENOENT:
        return False
    if err:
        raise OSError(-err, f"BPF_MAP_LOOKUP_ELEM: {os.strerror(-err)}")
    return True


def map_update(fd: int, key: int, value: int) -> None:
    err = _elem(BPF_MAP_UPDATE_ELEM, fd, key, value)
    if err:
        raise OSError(-err, f"BPF_MAP_UPDATE_ELEM: {os.strerror(-err)}")


def map_delete(fd: int, key: int) -> bool:
    """False if the key was not there."""
    err = _elem(BPF_MAP_DELETE_ELEM, fd, key, 0)
    if err == -ENOENT:
        return False
    if err:
        raise OSError(-err, f"BPF_MAP_DELETE_ELEM: {os.strerror(-err)}")
    return True


def map_next_key(fd: int, key: int, next_key: int) -> bool:
    """The key after the one at `key` (0: the first) into `next_key`; False at the end."""
    err = _elem(BPF_MAP_GET_NEXT_KEY, fd, key, next_key)
    if err == -ENOENT:
        return False
    if err:
        raise OSError(-err, f"BPF_MAP_GET_NEXT_KEY: {os.strerror(-err)}")
    return True


def map_batch(cmd: int, fd: int, keys: int, values: int, count: int) -> int:
    """BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH of `count` elements; how many were done."""
    attr = _BatchAttr(keys=keys, values=values, count=count, map_fd=fd)
    ret = int(_libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"batch command {cmd} after {attr.count} of {count}: {os.strerror(err)}")
    return int(attr.count)

