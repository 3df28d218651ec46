"""Handler of the proxy-route kind: the fwmark rule and the local table that deliver what the
datapath assigned to the L7 proxy's socket (bpf/lib/proxy.h), per family, through `ip`.

The mark is shared by every instance of a network namespace, the table is the instance's own
(naming.proxy_table), so each instance observes and removes only its rule and table.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from datapath import naming
from datapath.errors import KernelError
from datapath.plan import Key, ProxyRoute

MARK, MASK, PRIORITY = "0x200", "0xf00", "9"


def _ip(family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", f"-{family}", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise KernelError(f"ip -{family} {' '.join(args)}: {out.stderr.strip()}")
    return out


class ProxyRoutes:
    kind = ProxyRoute.kind

    def __init__(self, instance: str) -> None:
        self.table = naming.proxy_table(instance)
        self.rule = f"fwmark {MARK}/{MASK} lookup {self.table}"

    def observe(self, key: Key) -> ProxyRoute | None:
        family = int(key[1])
        return ProxyRoute(family, self.table) if self._present(family) else None

    def observe_all(self) -> Iterable[ProxyRoute]:
        return [ProxyRoute(f, self.table) for f in (4, 6) if self._present(f)]

    def _has_rule(self, family: int) -> bool:
        return self.rule in _ip(family, "rule", "show", "pref", PRIORITY, check=False).stdout

    def _present(self, family: int) -> bool:
        if not self._has_rule(family):
            return False
        routes = _ip(family, "route", "show", "table", str(self.table), check=False).stdout
        return any(line.startswith("local default dev lo") for line in routes.splitlines())

    def add(self, obj: ProxyRoute) -> None:
        _ip(obj.family, "route", "replace", "local", "default", "dev", "lo", "table", str(obj.table))
        if not self._has_rule(obj.family):
            _ip(obj.family, "rule", "add", "fwmark", f"{MARK}/{MASK}", "lookup", str(obj.table), "pref", PRIORITY)

    def change(self, old: ProxyRoute, new: ProxyRoute) -> None:
        self.add(new)

    def remove(self, obj: ProxyRoute) -> None:
        while _ip(obj.family, "rule", "del", "fwmark", f"{MARK}/{MASK}", "lookup", str(obj.table), "pref", PRIORITY,
                  check=False).returncode == 0:
            pass
        _ip(obj.family, "route", "flush", "table", str(obj.table), check=False)
