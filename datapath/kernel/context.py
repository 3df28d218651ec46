"""What every kernel handler shares: the netlink socket, the loaded datapath, ownership marks,
and the lookups one observe() or apply() may reuse (cleared by the executor around each).

The handler protocol lives here too: one handler per kind of plan object.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from datapath import naming
from datapath.errors import KernelError
from datapath.kernel.loader import Datapath
from datapath.kernel.netlink import ConfinedIPRoute
from datapath.plan import KernelObject, Key

_MISSING = object()
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.EINVAL)
_R = TypeVar("_R", bound=Callable[..., None])


def gone_ok(remove: _R) -> _R:
    """A removal whose netlink errors that mean "already gone" count as done."""

    @functools.wraps(remove)
    def wrapper(*args: Any) -> None:
        try:
            remove(*args)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise

    return wrapper  # type: ignore[return-value]


def attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class Handler(Protocol):
    """Observes and changes the kernel objects of one plan kind (`kind`, its class's `kind`).

    Only objects that carry our marks are observed, changed or removed. `remove` of what is
    already gone succeeds; `change` swaps old for new in one step where the kernel allows it.
    """

    kind: str

    def observe(self, key: Key) -> KernelObject | None: ...

    def observe_all(self) -> Iterable[KernelObject]: ...

    def add(self, obj: Any) -> None: ...

    def change(self, old: Any, new: Any) -> None: ...

    def remove(self, obj: Any) -> None: ...


class OnContext:
    """A handler that works on the executor's shared context."""

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx


class Replacing(OnContext):
    """Handlers whose add overwrites in place (map update, filter or route replace): a change is
    an add of the new value, so the object is never absent in between."""

    def add(self, obj: Any) -> None:
        raise NotImplementedError

    def change(self, old: Any, new: Any) -> None:
        self.add(new)


class KernelContext:
    """State shared by the handlers of one executor."""

    def __init__(self, instance: str, datapath: Datapath | None) -> None:
        self.instance = instance
        self.tag = naming.link_tag(instance)
        self.group = naming.link_group(instance)
        self.dp = datapath
        self.ipr = ConfinedIPRoute(name="netlink")  # handlers run on the agent's request threads
        self.cache: dict[tuple[Any, ...], Any] = {}  # lookups shared within one observe()/apply()
        self.caching = False

    def close(self) -> None:
        self.ipr.close()

    def begin(self) -> None:
        self.cache, self.caching = {}, True

    def end(self) -> None:
        self.cache, self.caching = {}, False

    def need_dp(self) -> Datapath:
        if self.dp is None:
            raise KernelError("the datapath is not loaded")
        return self.dp

    # -- links --------------------------------------------------------------------------------

    def link(self, name: str) -> Any | None:
        cached = self.cache.get(("link", name), _MISSING) if self.caching else _MISSING
        if cached is not _MISSING:
            return cached
        try:
            link = self.ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise
            link = None
        if self.caching:
            self.cache[("link", name)] = link
        return link

    def forget_link(self, name: str) -> None:
        self.cache.pop(("link", name), None)

    def owned(self, link: Any) -> bool:
        alias = attr(link, "IFLA_IFALIAS") or ""
        if alias:
            return bool(alias.startswith(self.tag))
        # Not tagged yet: the kernel ignores an alias in the request that creates a link, so we
        # tag in a second one. The group, set in the first, marks what we made if we died between.
        name = str(attr(link, "IFLA_IFNAME"))
        return attr(link, "IFLA_GROUP") == self.group and name.startswith(naming.HOST_PREFIX)

    def owned_link(self, name: str) -> Any | None:
        """The link called `name` if it is ours, else None."""
        link = self.link(name)
        return link if link is not None and self.owned(link) else None

    def index(self, name: str) -> int:
        if name.startswith("@"):
            return int(name[1:])
        link = self.owned_link(name)
        if link is None:
            raise KernelError(f"link {name} is missing or not owned by cellgate instance {self.instance}")
        return int(link["index"])

    def owned_links(self) -> list[Any]:
        """Every link of ours, dumped once per observe()."""
        links = self.cache.get(("links",)) if self.caching else None
        if links is None:
            links = [link for link in self.ipr.get_links() if self.owned(link)]
            if self.caching:
                self.cache[("links",)] = links
        return links

    def owned_names(self) -> dict[int, str]:
        return {int(link["index"]): str(attr(link, "IFLA_IFNAME")) for link in self.owned_links()}

    @staticmethod
    def link_kind(link: Any) -> str | None:
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        return str(kind) if kind is not None else None

    @staticmethod
    def ifname(ifindex: int) -> str | None:
        try:
            return socket.if_indextoname(ifindex)
        except OSError:
            return None

    def addresses(self, index: int) -> list[Any]:
        """Addresses we put on a device (the kernel's own link-local ones are not ours)."""
        found = (ipaddress.ip_address(attr(a, "IFA_ADDRESS")) for a in self.ipr.get_addr(index=index))
        return [a for a in found if not a.is_link_local]
