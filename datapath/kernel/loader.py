"""Compile bpf/ once with BCC, open the pinned maps, and hand out program file descriptors.

BCC only rewrites map calls (`map.lookup()`) in the file it is given, so the loader
inlines our own `#include "lib/..."` headers into one translation unit first, keeping
`#line` markers so compiler errors still point at the real file and line.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapath.errors import KernelError

log = logging.getLogger(__name__)

MAIN = "cg_lxc.c"
SOURCES = (MAIN, "cg_overlay.c", "cg_sock.c", "cg_netdev.c")  # one translation unit: one compile, shared maps
PROGRAMS = ("cg_from_container", "cg_to_container", "cg_from_overlay", "cg_to_overlay", "cg_from_netdev")
# cgroup sock_addr programs (bpf/cg_sock.c) and the attach type (BPFAttachType name) of each
SOCK_PROGRAMS = {
    "cg_sock_connect4": "CGROUP_INET4_CONNECT", "cg_sock_sendmsg4": "CGROUP_UDP4_SENDMSG",
    "cg_sock_recvmsg4": "CGROUP_UDP4_RECVMSG", "cg_sock_peer4": "CGROUP_INET4_GETPEERNAME",
    "cg_sock_connect6": "CGROUP_INET6_CONNECT", "cg_sock_sendmsg6": "CGROUP_UDP6_SENDMSG",
    "cg_sock_recvmsg6": "CGROUP_UDP6_RECVMSG", "cg_sock_peer6": "CGROUP_INET6_GETPEERNAME",
}
PINNED_MAPS = ("cg_endpoints", "cg_ips", "cg_metrics", "cg_events", "cg_policy", "cg_policy_exact", "cg_ipcache",
               "cg_ct", "cg_config", "cg_lb_services", "cg_lb_revnat", "cg_lb_sock", "cg_lb_netns", "cg_lb_flows")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _bpf_sources() -> Path:
    """bpf/ beside the packages (a checkout or an editable install: the live sources), else where
    a wheel install puts them (setup.cfg data_files: PREFIX/share/cellgate/bpf)."""
    here = Path(__file__).resolve()
    prefix = here.parents[min(5, len(here.parents) - 1)]  # PREFIX/lib/pythonX.Y/site-packages/datapath/kernel
    for candidate in (here.parents[2] / "bpf", prefix / "share/cellgate/bpf", Path(sys.prefix) / "share/cellgate/bpf"):
        if (candidate / MAIN).is_file():
            return candidate
    return here.parents[2] / "bpf"


BPF_SRC = _bpf_sources()


def expand_source(path: Path, root: Path = BPF_SRC, seen: set[Path] | None = None) -> str:
    """One translation unit from `path` with our quoted includes inlined once each."""
    seen = set() if seen is None else seen
    out = [f'#line 1 "{path}"']
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _INCLUDE.match(line)
        if match:
            header = (root / match.group(1)).resolve()
            if header not in seen:
                seen.add(header)
                out.append(expand_source(header, root, seen))
                out.append(f'#line {number + 1} "{path}"')
            else:
                out.append("")
        elif line.strip() == "#pragma once":
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def ensure_bpffs(directory: Path) -> str:
    """Mount bpffs on /sys/fs/bpf unless it is there already (a second mount would hide pins).

    Returns "" when the pins under `directory` outlive this process, else why they do not: a bpffs
    this call mounted in a mount namespace of its own (`ip netns exec` remounts /sys; a container
    without the host's /sys/fs/bpf) is a new instance that vanishes with the namespace, so a
    restart or `cleanup` would find nothing, and a program attached to a shared hierarchy (the
    cgroup2 root) would stay attached with no pin to find it by."""
    mounted_here = False
    if "/sys/fs/bpf" not in bpf_mounts():
        Path("/sys/fs/bpf").mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise KernelError(f"cannot mount bpffs on /sys/fs/bpf: {exc}") from exc
        log.info("mounted bpffs on /sys/fs/bpf")
        mounted_here = True
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    covering = max((m for m in bpf_mounts() if directory.resolve().is_relative_to(m)), key=len, default="")
    if mounted_here and covering == "/sys/fs/bpf" and not in_host_mount_namespace():
        return ("the agent runs in a mount namespace of its own where /sys/fs/bpf was not mounted "
                "(e.g. under `ip netns exec`), so its pins vanish with it; give --bpf-dir on a bpffs "
                "mounted in the host's namespace")
    return ""


def bpf_mounts() -> set[str]:
    """Mount points of bpffs in this mount namespace."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return {f[1] for line in lines if len(f := line.split()) > 2 and f[2] == "bpf"}


def in_host_mount_namespace() -> bool:
    """Whether this process shares PID 1's mount namespace (unknown counts as no)."""
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


@dataclass(frozen=True)
class Program:
    name: str
    fd: int


class Datapath:
    """The compiled programs and the maps they share, for the lifetime of the agent.

    The first start compiles bpf/ with BCC and pins every program under <pin_dir>/cache/<revision>.
    The revision hashes the sources, the build flags and the ids of the pinned maps: programs are
    bound to the maps they were loaded with, so a map replaced or removed behind our back makes a
    new revision, which compiles and replaces every attachment of the old one (whose programs would
    keep using maps the agent no longer writes). A later start of the same revision opens those
    pins and the pinned maps instead of compiling (`reused`), after checking that each program uses
    only maps pinned now.
    """

    def __init__(self, pin_dir: Path, max_endpoints: int = 65536, reuse: bool = True,
                 in_child: bool | None = None) -> None:
        """`reuse=False`: compile even when pinned programs of this revision exist, in this process
        (its own fresh programs, as an upgraded agent brings); `in_child` overrides where."""
        self.pin_dir = pin_dir
        self.pins_private = ensure_bpffs(pin_dir)  # "" or why the pins do not outlive this process
        if self.pins_private:
            log.warning("pins are private to this process: %s; a restart starts from nothing", self.pins_private)
        drop_stale_pins(pin_dir)
        seen: set[Path] = set()
        source = "\n".join(expand_source(BPF_SRC / name, BPF_SRC, seen) for name in SOURCES)
        cflags = [f'-DCG_PIN_DIR="{pin_dir}"', f"-DCG_MAX_ENDPOINTS={max_endpoints}"]
        self.build = hashlib.sha256((source + "\0" + " ".join(cflags)).encode()).hexdigest()
        self.bpf: Any = None
        self._ring: Any = None
        self._sink: Callable[[bytes], None] = lambda _raw: None
        started = time.monotonic()
        ids = pinned_map_ids(pin_dir)
        self.revision = self._revision(ids) if ids is not None else ""
        self.reused = bool(reuse and self.revision and self._open_cached())
        if not self.reused and (reuse if in_child is None else in_child):
            self._compile_in_child(max_endpoints)
        elif not self.reused:
            self._compile(source, cflags)
        self.compile_seconds = 0.0 if self.reused else time.monotonic() - started
        self.endpoints = self.tables["cg_endpoints"]
        self.ips = self.tables["cg_ips"]
        self.metrics = self.tables["cg_metrics"]
        self.policy = self.tables["cg_policy"]
        self.policy_exact = self.tables["cg_policy_exact"]
        self.ipcache = self.tables["cg_ipcache"]
        self.ct = self.tables["cg_ct"]
        self.config = self.tables["cg_config"]
        self.lb_services = self.tables["cg_lb_services"]
        self.lb_revnat = self.tables["cg_lb_revnat"]
        self.lb_sock = self.tables["cg_lb_sock"]
        self.lb_netns = self.tables["cg_lb_netns"]
        self.lb_flows = self.tables["cg_lb_flows"]
        if self.reused:
            log.info("datapath %s reused from its pinned programs in %.0f ms", self.revision[:12],
                     (time.monotonic() - started) * 1000)
        else:
            log.info("datapath %s built in %.0f ms", self.revision[:12], self.compile_seconds * 1000)

    def _compile_in_child(self, max_endpoints: int) -> None:
        """Compile in a child process, which pins the programs and exits; then open them as a
        restart does. BCC, clang and LLVM never enter this process: ~35 MB less resident for the
        agent's lifetime, and one way to open the datapath, the one every restart takes."""
        cmd = [sys.executable, "-m", "datapath.kernel.loader", str(self.pin_dir), str(max_endpoints)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"cannot build the datapath: {exc}") from exc
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise KernelError(last.removeprefix("cellgate-datapath: "))
        ids = pinned_map_ids(self.pin_dir)
        self.revision = self._revision(ids) if ids is not None else ""
        if not self.revision or not self._open_cached():
            raise KernelError(f"the datapath was built but its programs are not pinned in {self._cache_dir()}")

    def _compile(self, source: str, cflags: list[str]) -> None:
        try:
            from bcc import BPF, BPFAttachType
        except ImportError as exc:
            raise KernelError(
                "the BCC Python binding is missing: install python3-bpfcc and use a venv made "
                "with --system-site-packages"
            ) from exc
        try:
            self.bpf = BPF(text=source.encode(), cflags=cflags)
            self.programs = {
                name: Program(name, self.bpf.load_func(name.encode(), BPF.SCHED_CLS).fd) for name in PROGRAMS
            }
            self.sock_programs = {
                name: (Program(name, self.bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR,
                                                        attach_type=getattr(BPFAttachType, kind)).fd), kind)
                for name, kind in SOCK_PROGRAMS.items()
            }
        except Exception as exc:  # BCC raises bare Exception for compile and verifier errors
            raise KernelError(f"cannot build the datapath: {exc}") from exc
        release_compiler_memory()
        self.tables = {name: self.bpf[name.encode()] for name in PINNED_MAPS if name != "cg_events"}
        ids = pinned_map_ids(self.pin_dir)  # every map exists now
        if ids is None:
            raise KernelError(f"the datapath's maps are not all pinned in {self.pin_dir}")
        self.revision = self._revision(ids)
        try:
            self._cache_programs()
        except OSError as exc:  # the next start compiles again; nothing else depends on it
            log.warning("cannot keep the programs for the next start in %s: %s", self._cache_dir(), exc)

    # -- the program cache ------------------------------------------------------------------

    def _revision(self, map_ids: dict[str, int]) -> str:
        bound = ",".join(f"{name}={map_ids[name]}" for name in sorted(map_ids))
        return hashlib.sha256((self.build + "\0" + bound).encode()).hexdigest()[:16]

    def _cache_dir(self, revision: str = "") -> Path:
        return self.pin_dir / "cache" / (revision or self.revision)

    def _cache_programs(self) -> None:
        """Pin every program of this revision and drop the caches of other revisions. A crash on the
        way leaves a cache without some program, which the next start does not take (bpffs cannot
        rename a directory into place). A complete cache of this revision stays: its programs are
        the ones attached (the plan names attachments by revision, so it keeps them)."""
        from datapath.kernel import bpfsys

        final = self._cache_dir()
        if not all((final / name).exists() for name in (*PROGRAMS, *SOCK_PROGRAMS)):
            remove_cache(final)
            final.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name, prog in [*self.programs.items(), *((n, p) for n, (p, _) in self.sock_programs.items())]:
                bpfsys.obj_pin(prog.fd, str(final / name))
        for other in final.parent.iterdir():
            if other != final:
                remove_cache(other)

    def _open_cached(self) -> bool:
        """Open this revision's pinned programs and the pinned maps; False (and nothing kept open)
        when they are missing or the programs use other maps than those pinned now."""
        from datapath.kernel import bpfsys, layout
        from datapath.kernel.tables import PinnedTable

        cache = self._cache_dir()
        if not all((cache / name).exists() for name in (*PROGRAMS, *SOCK_PROGRAMS)):
            return False
        opened: list[Any] = []
        try:
            tables = {}
            for name in PINNED_MAPS:
                if name != "cg_events":
                    key, leaf = layout.MIRRORS[name]
                    tables[name] = PinnedTable(str(self.pin_dir / name), key, leaf)
                    opened.append(tables[name])
            map_ids = {bpfsys.map_info(t.fd)[0] for t in tables.values()}
            events = bpfsys.open_pinned(str(self.pin_dir / "cg_events"))
            try:
                map_ids.add(bpfsys.map_info(events)[0])
            finally:
                os.close(events)
            programs = {}
            for name in (*PROGRAMS, *SOCK_PROGRAMS):
                programs[name] = Program(name, bpfsys.open_pinned(str(cache / name)))
                opened.append(programs[name])
                stray = set(bpfsys.prog_map_ids(programs[name].fd)) - map_ids
                if stray:
                    raise OSError(f"{name} uses maps {sorted(stray)} that are no longer pinned")
        except OSError as exc:
            log.warning("not reusing the pinned programs of %s: %s; compiling", self.revision[:12], exc)
            for obj in opened:
                _close(obj)
            remove_cache(cache)
            return False
        self.tables = tables
        self.programs = {name: programs[name] for name in PROGRAMS}
        self.sock_programs = {name: (programs[name], kind) for name, kind in SOCK_PROGRAMS.items()}
        return True

    def filter_name(self, program: str) -> str:
        """Name of the tc filter running `program` at this revision."""
        return f"{program}/{self.revision}"

    # -- maps -------------------------------------------------------------------------------

    def counters(self) -> dict[int, tuple[int, int]]:
        """(packets, bytes) by verdict code, both directions together."""
        out: dict[int, tuple[int, int]] = {}
        for (code, _), (packets, size) in self.directed_counters().items():
            before = out.get(code, (0, 0))
            out[code] = (before[0] + packets, before[1] + size)
        return out

    PRESSURE_MAPS = ("cg_ct", "cg_ipcache", "cg_policy", "cg_policy_exact", "cg_endpoints", "cg_lb_services",
                     "cg_lb_flows", "cg_lb_sock")

    def map_pressure(self) -> dict[str, float]:
        """How full each hash map is (entries / max entries), counted by walking its keys."""
        out = {}
        for name in self.PRESSURE_MAPS:
            table = self.tables[name]
            out[name] = sum(1 for _ in table) / max(1, int(table.max_entries))
        return out

    def directed_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(packets, bytes) by (verdict code, direction: 0 from the endpoint, 1 towards it)."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for key, per_cpu in self.metrics.items():
            packets = sum(m.packets for m in per_cpu)
            if packets:
                out[(key.value & 0xFF, key.value >> 8)] = (packets, sum(m.bytes for m in per_cpu))
        return out

    # -- events -----------------------------------------------------------------------------

    def poll_events(self, sink: Callable[[bytes], None], timeout_ms: int) -> None:
        """Call `sink` with each raw event record; returns after at most `timeout_ms`."""
        self._sink = sink  # the ring buffer callback is registered once; it calls the latest sink
        if self.bpf is None:
            if self._ring is None:
                from datapath.kernel.tables import RingReader

                self._ring = RingReader(str(self.pin_dir / "cg_events"))
            self._ring.poll(self._deliver, timeout_ms)
            return
        if self._ring is None:

            def callback(_ctx: Any, data: Any, size: int) -> int:
                self._sink(ctypes.string_at(data, size))
                return 0

            self.bpf[b"cg_events"].open_ring_buffer(callback)
            self._ring = callback  # keep the ctypes callback alive
        self.bpf.ring_buffer_poll(timeout_ms)

    def _deliver(self, raw: bytes) -> None:
        self._sink(raw)

    def close(self) -> None:
        """Release our handles; pinned maps and attached programs stay in the kernel."""
        if self.bpf is not None:
            self.bpf.cleanup()
            return
        for obj in [*self.tables.values(), *self.programs.values(), *(p for p, _ in self.sock_programs.values())]:
            _close(obj)
        if self._ring is not None:
            self._ring.close()


def pinned_map_ids(pin_dir: Path) -> dict[str, int] | None:
    """The id of every map pinned in `pin_dir`, or None if one is missing."""
    from datapath.kernel import bpfsys

    out = {}
    for name in PINNED_MAPS:
        try:
            fd = bpfsys.open_pinned(str(pin_dir / name))
        except OSError:
            return None
        try:
            out[name] = bpfsys.map_info(fd)[0]
        finally:
            os.close(fd)
    return out


def _close(obj: Any) -> None:
    if isinstance(obj, Program):
        with contextlib.suppress(OSError):
            os.close(obj.fd)
    else:
        obj.close()


def remove_cache(directory: Path) -> None:
    """Unpin one revision's cached programs (attached ones stay attached: tc holds them)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        with contextlib.suppress(OSError):
            entry.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


_COMPILER_LIBS = re.compile(r"/lib(LLVM|clang)[^/]*\.so")
MADV_PAGEOUT = 21  # Linux 5.4+


def release_compiler_memory() -> None:
    """Give back what the one compile left resident: clang's freed heap (malloc_trim) and the
    pages of LLVM's and clang's code and constants (MADV_PAGEOUT on their read-only mappings;
    they fault back in only if something compiles again). Together about 100 MB of RSS, for an
    agent that never compiles again. Best effort: a kernel without MADV_PAGEOUT keeps them."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except (OSError, AttributeError):
        return
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for line in maps:
        parts = line.split()
        if len(parts) < 6 or "w" in parts[1] or not _COMPILER_LIBS.search(parts[5]):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(start, end - start, MADV_PAGEOUT)


def drop_stale_pins(pin_dir: Path) -> list[str]:
    """Unpin maps whose key or value size is not what this source declares (left by an older
    cellgate): BCC would reuse them as they are and the verifier refuse the programs. The
    agent rebuilds every map from its state on restore; only conntrack entries are lost, so
    live flows are decided again as new. Programs still attached keep the old maps until
    restore replaces them."""
    from datapath.kernel import layout
    from datapath.kernel.bpfsys import pinned_map_shape

    dropped = []
    for name, (key, value) in layout.MIRRORS.items():
        path = pin_dir / name
        if not path.exists():
            continue
        try:
            shape = pinned_map_shape(str(path))
        except OSError as exc:
            log.warning("cannot inspect the pinned map %s: %s", path, exc)
            continue
        entries = layout.FIXED_ENTRIES.get(name, shape.max_entries)
        if (shape.key_size, shape.value_size, shape.max_entries) != (ctypes.sizeof(key), ctypes.sizeof(value),
                                                                     entries):
            log.warning("pinned map %s has %d/%d-byte keys/values and %d entries, this datapath %d/%d and %d: "
                        "replacing it", name, shape.key_size, shape.value_size, shape.max_entries,
                        ctypes.sizeof(key), ctypes.sizeof(value), entries)
            path.unlink()
            dropped.append(name)
    return dropped


def remove_pins(pin_dir: Path) -> list[str]:
    removed = []
    if not pin_dir.is_dir():
        return removed
    for entry in pin_dir.iterdir():
        if entry.name in PINNED_MAPS:
            entry.unlink()
            removed.append(entry.name)
    cache = pin_dir / "cache"
    if cache.is_dir():
        for revision in cache.iterdir():
            remove_cache(revision)
            removed.append(f"cache/{revision.name}")
        with contextlib.suppress(OSError):
            cache.rmdir()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()
    return removed


def _build(argv: list[str]) -> int:
    """`python -m datapath.kernel.loader PIN_DIR MAX_ENDPOINTS`: compile, pin, exit (Datapath's child)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        Datapath(Path(argv[0]), int(argv[1]), reuse=False, in_child=False).close()
    except KernelError as exc:
        print(f"cellgate-datapath: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_build(sys.argv[1:]))

