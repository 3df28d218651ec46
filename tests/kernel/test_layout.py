"""The ctypes mirrors in datapath/kernel/layout.py against the layouts the C compiler gives.

Two independent checks: the Key/Leaf types BCC derives from the compiled datapath, and
`_Static_assert`s on sizeof/offsetof compiled by BCC's clang from bpf/lib/maps.h itself.
"""

from __future__ import annotations

import ctypes
import json
import secrets
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datapath import events
from datapath.kernel import layout
from datapath.kernel.bpfsys import pinned_map_shape
from datapath.kernel.loader import BPF_SRC, Datapath, drop_stale_pins, expand_source, remove_pins

from .conftest import BPF_ROOT

pytestmark = pytest.mark.kernel

C_NAMES = {
    layout.CgEndpoint: "cg_endpoint",
    layout.CgIpKey: "cg_ip_key",
    layout.CgMetric: "cg_metric",
    layout.CgEvent: "cg_event",
    layout.CgPolicyKey: "cg_policy_key",
    layout.CgPolicyValue: "cg_policy_value",
    layout.CgIpcacheKey: "cg_ipcache_key",
    layout.CgIpcacheValue: "cg_ipcache_value",
    layout.CgCtKey: "cg_ct_key",
    layout.CgCtValue: "cg_ct_value",
    layout.CgConfig: "cg_config",
}


def shape(ctype: Any) -> list[tuple[str, int, int]] | int:
    """(name, offset, size) of every field of a struct, or the size of a scalar."""
    if not hasattr(ctype, "_fields_"):
        return ctypes.sizeof(ctype)
    return [(name, getattr(ctype, name).offset, getattr(ctype, name).size) for name, *_ in ctype._fields_]


@pytest.fixture(scope="module")
def bcc_datapath() -> Iterator[Any]:
    """A datapath compiled in this process, so that BCC's own view of the maps is at hand (an agent
    compiles in a child process and never holds it)."""
    pin_dir = Path("/sys/fs/bpf") / f"cgk{secrets.token_hex(4)}"
    dp = Datapath(pin_dir, max_endpoints=16, reuse=False, in_child=False)
    try:
        yield dp
    finally:
        dp.close()
        remove_pins(pin_dir)


@pytest.mark.parametrize("map_name", sorted(layout.MIRRORS))
def test_mirror_matches_the_types_bcc_derives(bcc_datapath: Any, map_name: str) -> None:
    key_mirror, leaf_mirror = layout.MIRRORS[map_name]
    table = bcc_datapath.bpf[map_name.encode()]
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: Leaf is an array of sLeaf

    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key_mirror)
    assert shape(table.Key) == shape(key_mirror)
    assert ctypes.sizeof(leaf) == ctypes.sizeof(leaf_mirror)
    assert shape(leaf) == shape(leaf_mirror)


def test_event_record_format_matches_the_ctypes_mirror() -> None:
    fields = layout.CgEvent._fields_
    codes = struct.Struct(events.EVENT.format).format.lstrip("<")
    items = []  # one struct code per field: "Q", "B", ..., "6s"
    i = 0
    while i < len(codes):
        j = i
        while codes[j].isdigit():
            j += 1
        items.append(codes[i : j + 1])
        i = j + 1

    assert events.EVENT.size == events.EVENT_SIZE == ctypes.sizeof(layout.CgEvent)
    assert len(items) == len(fields)
    offset = 0
    for code, (name, _ctype) in zip(items, fields, strict=True):
        size = struct.calcsize("<" + code)
        assert (name, offset, size) == (name, getattr(layout.CgEvent, name).offset, getattr(layout.CgEvent, name).size)
        offset += size


def _static_asserts(mirror: Any, wrong: str | None = None) -> list[str]:
    cname = C_NAMES[mirror]
    lines = [f'_Static_assert(sizeof(struct {cname}) == {ctypes.sizeof(mirror)}, "sizeof {cname}");']
    for name, *_ in mirror._fields_:
        off = getattr(mirror, name).offset + (1 if name == wrong else 0)
        size = getattr(mirror, name).size
        lines.append(f'_Static_assert(offsetof(struct {cname}, {name}) == {off}, "offsetof {cname}.{name}");')
        lines.append(f'_Static_assert(sizeof(((struct {cname} *)0)->{name}) == {size}, "sizeof {cname}.{name}");')
    return lines


@pytest.fixture
def check_pin_dir() -> Iterator[Path]:
    """maps.h declares pinned maps; a compile of it pins them here, removed afterwards."""
    pin_dir = BPF_ROOT / f"cgkl{secrets.token_hex(3)}"
    try:
        yield pin_dir
    finally:
        remove_pins(pin_dir)


def _compile_maps_h(pin_dir: Path, checks: list[str]) -> None:
    from bcc import BPF

    pin_dir.mkdir(mode=0o700)
    source = expand_source(BPF_SRC / "lib" / "maps.h") + "\n" + "\n".join(checks) + "\n"
    BPF(text=source.encode(), cflags=[f'-DCG_PIN_DIR="{pin_dir}"']).cleanup()


def test_mirrors_match_the_c_structs_compiled_from_maps_h(
    check_pin_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    checks = [line for mirror in C_NAMES for line in _static_asserts(mirror)]
    _compile_maps_h(check_pin_dir, checks)  # clang names the first mismatching field
    capfd.readouterr()

    # The check bites: one offset off by one must fail the same compile, naming that field.
    remove_pins(check_pin_dir)
    with pytest.raises(Exception, match="Failed to compile"):
        _compile_maps_h(check_pin_dir, _static_asserts(layout.CgEvent, wrong="sport"))
    assert "offsetof cg_event.sport" in capfd.readouterr().err


def _map_id(path: Path) -> int:
    shown = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(path)], check=True,
                           capture_output=True, text=True).stdout
    return int(json.loads(shown)["id"])


def _pin_map(path: Path, kind: str, key: int, value: int) -> int:
    """A map pinned at `path` by bpftool; returns its id."""
    subprocess.run(["bpftool", "map", "create", str(path), "type", kind, "key", str(key), "value", str(value),
                    "entries", "16", "name", path.name[:15]], check=True, capture_output=True)
    return _map_id(path)


def test_a_datapath_starts_over_maps_pinned_with_an_older_layout(check_pin_dir: Path) -> None:
    """An upgrade that grows a map's value: the stale pin is replaced, a current one kept."""
    check_pin_dir.mkdir(mode=0o700)
    ct_key, ct_value = (ctypes.sizeof(t) for t in layout.MIRRORS["cg_ct"])
    _pin_map(check_pin_dir / "cg_ct", "lru_hash", ct_key, ct_value - 8)  # the value before this layout
    kept = _pin_map(check_pin_dir / "cg_endpoints", "hash", 4, ctypes.sizeof(layout.CgEndpoint))

    assert drop_stale_pins(check_pin_dir) == ["cg_ct"]
    assert not (check_pin_dir / "cg_ct").exists() and (check_pin_dir / "cg_endpoints").exists()

    _pin_map(check_pin_dir / "cg_ct", "lru_hash", ct_key, ct_value - 8)
    dp = Datapath(check_pin_dir, max_endpoints=16)  # the verifier would refuse the programs on the old cg_ct
    try:
        assert pinned_map_shape(str(check_pin_dir / "cg_ct")).value_size == ct_value
        assert _map_id(check_pin_dir / "cg_endpoints") == kept, "a map of the current layout is reused"
    finally:
        dp.close()


def test_packed_policy_keys_and_values_read_back_as_written() -> None:
    from datapath.policy.compile import PolicyKey, PolicyValue

    keys = [PolicyKey(256, False, 0, 0, 0, 0, any_proto=True), PolicyKey(0x00F00001, True, 7, 6, 8080, 16),
            PolicyKey(300, False, 0x00E00000, 17, 0x1000, 4), PolicyKey(5, True, 9, 1, 0, 0)]
    values = [PolicyValue(False, 0), PolicyValue(True, 12), PolicyValue(False, 0xFFFFFFFF), PolicyValue(True, 1)]
    packed_keys, packed_values = layout.policy_keys(keys), layout.policy_values(values)
    assert [layout.policy_key_value(k) for k in packed_keys] == keys
    assert [layout.policy_value_value(v) for v in packed_values] == values
    assert bytes(packed_keys)[16 + 14:16 + 16] == (8080).to_bytes(2, "big")  # dport in network order
    assert bytes(packed_keys)[12] == 0 and bytes(packed_keys)[16] == 80 + 16  # egress byte, prefixlen
