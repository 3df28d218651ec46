"""Pin again what was unpinned behind the agent's back (its bpffs directory emptied while it runs):
the maps, the cached programs of this revision and the attached socket programs, from the
descriptors the agent holds. A restart then finds the maps and programs that run now, instead of
making new maps, a new revision and socket programs that nothing could detach again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datapath import naming
from datapath.kernel import bpfsys
from datapath.kernel.loader import PINNED_MAPS, PROGRAMS, SOCK_PROGRAMS

log = logging.getLogger(__name__)


def _fd(obj: Any) -> int | None:
    """The descriptor of a table, program or ring (ours or BCC's), None if it has none open."""
    for name in ("fd", "map_fd"):
        fd = getattr(obj, name, None)
        if isinstance(fd, int) and fd >= 0:
            return fd
    return None


def repin(dp: Any, sock_programs_attached: bool) -> list[str]:
    """Pin every missing pin of `dp` (a loaded datapath.kernel.loader.Datapath); the pins made, relative
    to its pin dir. `sock_programs_attached`: the socket programs are ours on the cgroup2 root (their
    pins are how `cleanup` and the next agent find them)."""
    pin_dir: Path = dp.pin_dir
    wanted: list[tuple[Path, int | None]] = []
    tables = getattr(dp, "tables", {})
    for name in PINNED_MAPS:
        obj = dp._ring if name == "cg_events" else tables.get(name)
        wanted.append((pin_dir / name, _fd(obj) if obj is not None else None))
    cache = pin_dir / "cache" / dp.revision
    programs = dict(dp.programs) | {name: prog for name, (prog, _) in dp.sock_programs.items()}
    wanted += [(cache / name, _fd(programs[name])) for name in (*PROGRAMS, *SOCK_PROGRAMS) if name in programs]
    if sock_programs_attached:
        progs = Path(naming.sock_pin_dir(str(pin_dir)))
        wanted += [(progs / f"{name}@{dp.revision}", _fd(prog)) for name, (prog, _) in dp.sock_programs.items()]
    made = []
    for path, fd in wanted:
        if fd is None or path.exists():
            continue  # present, or nothing of ours to pin there (the ring before its reader opened)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            bpfsys.obj_pin(fd, str(path))
        except OSError as exc:
            log.warning("cannot pin %s again: %s", path, exc)
            continue
        made.append(str(path.relative_to(pin_dir)))
    return made
