"""The bpf(2) syscall through ctypes: BPF_PROG_TEST_RUN, which BCC does not wrap.

Standard library only. x86-64 and arm64 syscall numbers; root (CAP_BPF + CAP_NET_ADMIN).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_PROG_TEST_RUN = 10
_libc = ctypes.CDLL(None, use_errno=True)


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
        if _libc.syscall(_SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
        return TestRun(attr.retval, attr.duration)
