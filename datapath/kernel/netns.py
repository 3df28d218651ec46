"""Work inside a container's network namespace (CNI): validate it, plumb the interface.

The runtime owns the namespace; we never create or delete it. A path is accepted only
if it really is a network namespace (NS_GET_NSTYPE), so `/etc/passwd` or a directory
is refused before anything happens.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from datapath.errors import InvalidRequest, KernelError
from datapath.model import IPAddress, IPInterface

log = logging.getLogger(__name__)

NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
IFA_F_NODAD = 0x02


@dataclass(frozen=True)
class InterfaceState:
    mac: str
    addresses: tuple[IPInterface, ...]
    up: bool


@contextmanager
def open_netns(path: str) -> Iterator[int]:
    """A file descriptor of the network namespace at `path`, or InvalidRequest."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidRequest(f"network namespace {path!r}: {exc.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = 0
        if kind != CLONE_NEWNET:
            raise InvalidRequest(f"{path!r} is not a network namespace")
        yield fd
    finally:
        os.close(fd)


def refuse_own(fd: int, path: str) -> None:
    """A container namespace is never our own (the host's): libcni's skel refuses it too."""
    target, own = os.fstat(fd), os.stat("/proc/self/ns/net")
    if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino):
        raise InvalidRequest(f"{path!r} is the host's own network namespace, not a container's")


_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(ns_fd: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in the namespace `ns_fd`.

    A socket belongs to the namespace of the thread that creates it, so a short-lived
    thread enters the namespace, opens the socket and leaves; nobody else moves. (pyroute2's
    own netns support forks a helper process, which costs fifteen times as much.)
    """
    result: dict[str, Any] = {}

    def enter_and_open() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                result["error"] = OSError(ctypes.get_errno(), "setns into the network namespace failed")
                return
            try:
                result["socket"] = socket.socket(family, kind, proto)
            except OSError as exc:
                result["error"] = exc
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    result["error"] = OSError(ctypes.get_errno(), "cannot return to the host namespace")
        finally:
            os.close(own)

    worker = threading.Thread(target=enter_and_open, name="netns")
    worker.start()
    worker.join()
    if "error" in result:
        if "socket" in result:
            result["socket"].close()
        raise KernelError(str(result["error"]))
    sock: socket.socket = result["socket"]
    return sock


def netlink_socket_in(ns_fd: int) -> socket.socket:
    """A route netlink socket that lives in the namespace `ns_fd`."""
    return socket_in(ns_fd, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)


class NetnsOps:
    """The Netns port: what the CNI path needs to do inside a namespace.

    Every netlink handle is opened, used and closed by the thread that asks (a request thread of
    the agent): pyroute2 keeps per-thread state in an IPRoute that another thread uses and frees
    it only on close (datapath.kernel.netlink says what), so none lives from one call to the next.
    `host`, if given, must be safe to call from any thread (a ConfinedIPRoute)."""

    def __init__(self, host: Any | None = None) -> None:
        self._host = host

    @contextmanager
    def _host_ipr(self) -> Iterator[Any]:
        if self._host is not None:
            yield self._host
            return
        with IPRoute() as ipr:
            yield ipr

    @staticmethod
    @contextmanager
    def _ipr_in(fd: int) -> Iterator[IPRoute]:
        """An IPRoute on a fresh socket in the namespace `fd`, closed with its socket afterwards."""
        sock = netlink_socket_in(fd)
        try:
            ipr = IPRoute(use_socket=sock)
        except BaseException:
            sock.close()
            raise
        try:
            yield ipr
        finally:
            ipr.close()
            sock.close()  # the transport closes it already; a second close is a no-op

    @contextmanager
    def _inside(self, path: str) -> Iterator[IPRoute]:
        with open_netns(path) as fd, self._ipr_in(fd) as ipr:
            yield ipr

    def check(self, path: str) -> None:
        with open_netns(path) as fd:
            refuse_own(fd, path)

    def interface(self, path: str, ifname: str) -> InterfaceState | None:
        with self._inside(path) as ipr:
            return _state(ipr, ifname)

    def attach(self, path: str, peer: str, ifname: str, addresses: Sequence[IPInterface],
               gateways: Sequence[IPAddress]) -> list[IPAddress]:
        """Bring `peer` into the namespace as `ifname`, address it, and route via the gateways.

        The peer is usually born there already under `ifname` (the executor creates it in
        the namespace the endpoint names); one left in the host namespace is moved in.
        Returns the gateways a default route was installed for (a namespace that already has a
        default route, from another network, keeps it)."""
        try:
            with open_netns(path) as fd:
                refuse_own(fd, path)
                outside = _host_index(peer)
                if outside:
                    with self._host_ipr() as host:
                        host.link("set", index=outside, net_ns_fd=fd)
                with self._ipr_in(fd) as ipr:
                    return self._configure(ipr, peer if outside else ifname, ifname, addresses, gateways)
        except NetlinkError as exc:
            raise KernelError(f"configuring {ifname} in {path}: {exc}") from exc

    @staticmethod
    def _configure(ipr: IPRoute, peer: str, ifname: str, addresses: Sequence[IPInterface],
                   gateways: Sequence[IPAddress]) -> list[IPAddress]:
        found = ipr.link_lookup(ifname=peer)
        if not found:
            raise KernelError(f"interface {peer} is missing")
        index = found[0]
        if peer != ifname:
            ipr.link("set", index=index, ifname=ifname)
        for addr in addresses:
            flags = IFA_F_NODAD if addr.version == 6 else 0
            ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen, flags=flags)
        ipr.link("set", index=index, state="up")
        routed = []
        for gw in gateways:
            family = 2 if gw.version == 4 else 10
            if any(r["dst_len"] == 0 for r in ipr.get_routes(family=family, table=254)):
                continue  # the namespace already has a default route (another network)
            ipr.route("add", dst="default", gateway=str(gw), oif=index, family=family)
            routed.append(gw)
        return routed

    def detach(self, path: str, ifname: str) -> None:
        """Remove `ifname` from the namespace if it is still there (best effort)."""
        try:
            with self._inside(path) as ipr:
                found = ipr.link_lookup(ifname=ifname)
                if found:
                    ipr.link("del", index=found[0])
        except InvalidRequest:
            return  # the namespace is gone: so is the interface
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise KernelError(f"removing {ifname} from {path}: {exc}") from exc


def _host_index(name: str) -> int:
    """The index of the link `name` in our own namespace, 0 if there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _state(ipr: IPRoute, ifname: str) -> InterfaceState | None:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return None
    link: Any = ipr.link("get", index=found[0])[0]
    addrs = []
    for a in ipr.get_addr(index=found[0]):
        ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
        if not ip.is_link_local:
            addrs.append(ipaddress.ip_interface(f"{ip}/{a['prefixlen']}"))
    return InterfaceState(str(link.get_attr("IFLA_ADDRESS")), tuple(addrs), link["flags"] & 1 == 1)


SO_NETNS_COOKIE = 71  # Linux 5.14+


def netns_ready(path: str) -> bool:
    """Whether `path` is a network namespace yet (Docker's sandbox key becomes one only when the
    container's runtime hook mounts it, after the driver's Join)."""
    try:
        with open_netns(path):
            return True
    except InvalidRequest:
        return False


def netns_cookie(path: str = "") -> int:
    """The kernel's cookie of the network namespace at `path` ("" = our own), which the socket
    programs read with bpf_get_netns_cookie(): a socket made there answers SO_NETNS_COOKIE."""
    if not path:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        with open_netns(path) as ns_fd:
            sock = socket_in(ns_fd, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        try:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError as exc:
            raise KernelError(f"netns cookie of {path or 'our namespace'}: {exc}") from exc
