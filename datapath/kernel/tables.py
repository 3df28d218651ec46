"""Pinned maps and the event ring without BCC: what an agent uses when it reuses the programs it
pinned at an earlier start (datapath.kernel.loader), so that no compiler runs.

The tables behave like BCC's for everything the kernel adapter does with them: `t[key]`,
`t[key] = leaf`, `del t[key]`, `pop`, iteration, `items()`, `items_update_batch` and
`items_delete_batch`, `Key`, `Leaf` and `max_entries`; a per-CPU array gives a sequence of
leaves per key. Keys and leaves are the ctypes mirrors of datapath.kernel.layout.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
from collections.abc import Callable, Iterator
from typing import Any

from datapath.kernel import bpfsys

BPF_MAP_TYPE_PERCPU_ARRAY = 6


def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a value for (/sys/devices/system/cpu/possible)."""
    from pathlib import Path

    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class PinnedTable:
    """One pinned map, opened by path."""

    def __init__(self, path: str, key: Any, leaf: Any) -> None:
        self.fd = bpfsys.open_pinned(path)
        self.Key, self.Leaf = key, leaf
        _, shape = bpfsys.map_info(self.fd)
        self.max_entries = shape.max_entries
        self.percpu = shape.type == BPF_MAP_TYPE_PERCPU_ARRAY
        if shape.key_size != ctypes.sizeof(key) or (not self.percpu and shape.value_size != ctypes.sizeof(leaf)):
            os.close(self.fd)
            raise OSError(f"{path}: {shape.key_size}/{shape.value_size}-byte keys/values, expected "
                          f"{ctypes.sizeof(key)}/{ctypes.sizeof(leaf)}")
        self._value_type: Any = (leaf * possible_cpus()) if self.percpu else leaf

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _key(self, key: Any) -> Any:
        return key if isinstance(key, self.Key) else self.Key.from_buffer_copy(bytes(key))

    def __getitem__(self, key: Any) -> Any:
        k, value = self._key(key), self._value_type()
        if not bpfsys.map_lookup(self.fd, ctypes.addressof(k), ctypes.addressof(value)):
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: Any, leaf: Any) -> None:
        k = self._key(key)
        value = leaf if isinstance(leaf, self._value_type) else self._value_type.from_buffer_copy(bytes(leaf))
        bpfsys.map_update(self.fd, ctypes.addressof(k), ctypes.addressof(value))

    def __delitem__(self, key: Any) -> None:
        k = self._key(key)
        if not bpfsys.map_delete(self.fd, ctypes.addressof(k)):
            raise KeyError(key)

    def pop(self, key: Any, *default: Any) -> Any:
        try:
            value = self[key]
            del self[key]
        except KeyError:
            if default:
                return default[0]
            raise
        return value

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    def keys(self) -> list[Any]:
        out: list[Any] = []
        current = None
        while True:
            nxt = self.Key()
            found = bpfsys.map_next_key(self.fd, ctypes.addressof(current) if current is not None else 0,
                                        ctypes.addressof(nxt))
            if not found:
                return out
            out.append(nxt)
            current = nxt

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for key in self.keys():
            value = self.get(key)
            if value is not None:  # gone between the walk and the lookup
                out.append((key, value))
        return out

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def clear(self) -> None:
        for key in self.keys():
            bpfsys.map_delete(self.fd, ctypes.addressof(key))

    def items_update_batch(self, keys: Any, values: Any) -> None:
        count = len(keys)
        if count:
            bpfsys.map_batch(bpfsys.BPF_MAP_UPDATE_BATCH, self.fd, ctypes.addressof(keys), ctypes.addressof(values),
                             count)

    def items_delete_batch(self, keys: Any) -> None:
        count = len(keys)
        if count:
            bpfsys.map_batch(bpfsys.BPF_MAP_DELETE_BATCH, self.fd, ctypes.addressof(keys), 0, count)


BUSY, DISCARD, HEADER = 1 << 31, 1 << 30, 8


class RingReader:
    """The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF), as libbpf's ring_buffer:
    the consumer position page (ours to write), the producer page and the data pages mapped
    twice in a row, so that a record that wraps reads as one."""

    def __init__(self, path: str) -> None:
        self.fd = bpfsys.open_pinned(path)
        _, shape = bpfsys.map_info(self.fd)
        self.size = shape.max_entries
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._page = page
        self._poll = select.epoll()
        self._poll.register(self.fd, select.EPOLLIN)

    def consume(self, sink: Callable[[bytes], None]) -> int:
        """Hand every complete record to `sink`; how many there were."""
        (cons,) = struct.unpack_from("<Q", self._consumer, 0)
        count = 0
        while True:
            (prod,) = struct.unpack_from("<Q", self._data, 0)
            if cons >= prod:
                return count
            while cons < prod:
                at = self._page + (cons & (self.size - 1))
                (length,) = struct.unpack_from("<I", self._data, at)
                if length & BUSY:
                    return count  # the producer is still writing it
                size = length & ~(BUSY | DISCARD)
                if not length & DISCARD:
                    sink(self._data[at + HEADER:at + HEADER + size])
                    count += 1
                cons += (size + HEADER + 7) & ~7
                struct.pack_into("<Q", self._consumer, 0, cons)

    def poll(self, sink: Callable[[bytes], None], timeout_ms: int) -> None:
        if not self.consume(sink):
            self._poll.poll(timeout_ms / 1000)
            self.consume(sink)

    def close(self) -> None:
        if self.fd >= 0:
            self._poll.close()
            self._consumer.close()
            self._data.close()
            os.close(self.fd)
            self.fd = -1
