"""The cgroup socket programs (bpf/cg_sock.c) on the cgroup2 root: attached with
BPF_F_ALLOW_MULTI (several instances coexist, each serving its own namespaces), pinned under
<bpf dir>/progs so that they stay attached across agent restarts and `cleanup` finds them.

A new revision is attached before the old one is detached: a connect() always meets one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from datapath import naming
from datapath.errors import KernelError
from datapath.kernel import bpfsys
from datapath.kernel.context import KernelContext, OnContext
from datapath.kernel.loader import SOCK_PROGRAMS
from datapath.plan import Key, SockPrograms

log = logging.getLogger(__name__)

# enum bpf_attach_type values (include/uapi/linux/bpf.h) of the BPFAttachType names in SOCK_PROGRAMS
ATTACH_TYPES = {
    "CGROUP_INET4_CONNECT": 10, "CGROUP_INET6_CONNECT": 11, "CGROUP_UDP4_SENDMSG": 14,
    "CGROUP_UDP6_SENDMSG": 15, "CGROUP_UDP4_RECVMSG": 19, "CGROUP_UDP6_RECVMSG": 20,
    "CGROUP_INET4_GETPEERNAME": 29, "CGROUP_INET6_GETPEERNAME": 30,
}
REVISION = "revision"  # pinned programs are named <program>@<revision>


def find_cgroup2() -> str:
    """The cgroup2 mount the socket programs attach to: /sys/fs/cgroup/unified on a hybrid
    host, /sys/fs/cgroup on a unified one; "" if there is none."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    found = [f[1] for line in mounts if len(f := line.split()) > 2 and f[2] == "cgroup2"]
    for preferred in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if preferred in found:
            return preferred
    return found[0] if found else ""


OWN_MOUNT = "/run/cellgate/cgroupv2"


def ensure_cgroup2() -> str:
    """find_cgroup2(), else cgroup2 mounted at OWN_MOUNT (as Cilium mounts /run/cilium/cgroupv2):
    a mount namespace without the host's cgroup mounts (`ip netns exec` remounts /sys) still
    reaches the same hierarchy, whose root is every process's. "" if cgroup2 cannot be mounted."""
    found = find_cgroup2()
    if found:
        return found
    Path(OWN_MOUNT).mkdir(parents=True, exist_ok=True, mode=0o700)
    done = subprocess.run(["mount", "-t", "cgroup2", "none", OWN_MOUNT], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.warning("cannot mount cgroup2 at %s: %s", OWN_MOUNT, done.stderr.strip())
        return ""
    log.info("mounted cgroup2 at %s", OWN_MOUNT)
    return OWN_MOUNT


def pinned(pin_dir: Path) -> dict[str, tuple[str, Path]]:
    """program -> (revision, pin path) of what is pinned in <pin_dir>/progs."""
    out: dict[str, tuple[str, Path]] = {}
    progs = Path(naming.sock_pin_dir(str(pin_dir)))
    if not progs.is_dir():
        return out
    for entry in progs.iterdir():
        name, _, revision = entry.name.partition("@")
        if name in SOCK_PROGRAMS and revision:
            out[name] = (revision, entry)
    return out


def _attached(cgroup_fd: int, name: str, path: Path) -> bool:
    kind = ATTACH_TYPES[SOCK_PROGRAMS[name]]
    try:
        fd = bpfsys.open_pinned(str(path))
    except OSError:
        return False
    try:
        return bpfsys.prog_id(fd) in bpfsys.attached_ids(cgroup_fd, kind)
    finally:
        os.close(fd)


def detach_pinned(pin_dir: Path, cgroup: str) -> list[str]:
    """Detach and unpin every socket program pinned under pin_dir (cleanup, and removal)."""
    gone = []
    found = pinned(pin_dir)
    if not found:
        return gone
    if not cgroup or not os.path.isdir(cgroup):
        log.warning("socket programs under %s kept pinned: no cgroup2 directory to detach them from", pin_dir)
        return gone
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, (_revision, path) in found.items():
            kind = ATTACH_TYPES[SOCK_PROGRAMS[name]]
            try:  # unpinned only once it is not attached here: a pin is how cleanup finds it again
                fd = bpfsys.open_pinned(str(path))
                try:
                    if bpfsys.prog_id(fd) in bpfsys.attached_ids(cg_fd, kind):
                        bpfsys.prog_detach(cg_fd, fd, kind)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("socket program %s kept pinned, not detached from %s: %s", name, cgroup, exc)
                continue
            path.unlink()
            gone.append(name)
    finally:
        os.close(cg_fd)
    with contextlib.suppress(OSError):
        Path(naming.sock_pin_dir(str(pin_dir))).rmdir()
    return sorted(gone)


class SockProgramsHandler(OnContext):
    kind = SockPrograms.kind

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)

    def observe(self, key: Key) -> SockPrograms | None:
        dp = self.ctx.dp
        cgroup = key[1]
        if dp is None or not os.path.isdir(cgroup):
            return None
        found = pinned(dp.pin_dir)
        revisions = {rev for rev, _ in found.values()}
        if set(found) != set(SOCK_PROGRAMS) or len(revisions) != 1:
            return None
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not all(_attached(cg_fd, name, path) for name, (_, path) in found.items()):
                return None
        finally:
            os.close(cg_fd)
        return SockPrograms(cgroup, revisions.pop())

    def observe_all(self) -> Iterable[SockPrograms]:
        cgroup = find_cgroup2()
        found = self.observe((self.kind, cgroup)) if cgroup else None
        return [found] if found is not None else []

    def add(self, obj: SockPrograms) -> None:
        dp = self.ctx.need_dp()
        if obj.revision != dp.revision:
            raise KernelError(f"socket programs of revision {obj.revision} asked, {dp.revision} loaded")
        progs = Path(naming.sock_pin_dir(str(dp.pin_dir)))
        progs.mkdir(parents=True, exist_ok=True, mode=0o700)
        old = pinned(dp.pin_dir)
        cg_fd = os.open(obj.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, kind_name in SOCK_PROGRAMS.items():
                fn, _ = dp.sock_programs[name]
                kind = ATTACH_TYPES[kind_name]
                path = progs / f"{name}@{obj.revision}"
                previous = old.get(name)
                if previous is not None and previous[1] == path and _attached(cg_fd, name, path):
                    continue  # the same revision is in place already
                bpfsys.prog_attach(cg_fd, fn.fd, kind)  # the new one first: no connect() misses both
                if previous is not None:
                    with contextlib.suppress(OSError):
                        fd = bpfsys.open_pinned(str(previous[1]))
                        try:
                            bpfsys.prog_detach(cg_fd, fd, kind)
                        finally:
                            os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        previous[1].unlink()
                bpfsys.obj_pin(fn.fd, str(path))
        finally:
            os.close(cg_fd)
        log.info("socket load balancing attached to %s (revision %s)", obj.cgroup, obj.revision[:12])

    def change(self, old: SockPrograms, new: SockPrograms) -> None:
        self.add(new)

    def remove(self, obj: SockPrograms) -> None:
        dp = self.ctx.need_dp()
        detach_pinned(dp.pin_dir, obj.cgroup)


HANDLERS = (SockProgramsHandler,)
