"""The iptables kind (masquerade per network subnet) and the chains it lives in."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable

from datapath import naming
from datapath.kernel.links import sysctl
from datapath.plan import Key, Masquerade


class Iptables:
    """Masquerade and forwarding for traffic that leaves the host, per network subnet.

    Rules live in chains named after the instance, reached by one commented jump each
    from POSTROUTING and FORWARD, so teardown finds exactly ours.
    """

    def __init__(self, instance: str) -> None:
        self.nat = naming.nat_chain(instance)
        self.fwd = naming.forward_chain(instance)
        self.comment = f"cellgate:{instance}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["iptables", "-w", *args], check=check, capture_output=True, text=True)

    @staticmethod
    def _rules(subnet: ipaddress.IPv4Network) -> list[tuple[str, list[str]]]:
        s = str(subnet)
        return [
            ("nat", ["-s", s, "!", "-d", s, "-j", "MASQUERADE"]),
            ("filter", ["-i", "cg+", "-s", s, "-j", "ACCEPT"]),
            ("filter", ["-o", "cg+", "-d", s, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]),
        ]

    @staticmethod
    def _exempt_rule(subnet: ipaddress.IPv4Network, dst: ipaddress.IPv4Network) -> list[str]:
        """Cluster traffic keeps its source: a RETURN ahead of the subnet's MASQUERADE."""
        return ["-s", str(subnet), "-d", str(dst), "-j", "RETURN"]

    def subnets(self) -> list[ipaddress.IPv4Network]:
        return [m.subnet for m in self.masquerades()]

    def masquerades(self) -> list[Masquerade]:
        try:
            out = self._run("-t", "nat", "-S", self.nat, check=False)
        except FileNotFoundError:
            return []
        found: list[ipaddress.IPv4Network] = []
        exempt: dict[ipaddress.IPv4Network, list[ipaddress.IPv4Network]] = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts[:2] != ["-A", self.nat] or "-s" not in parts:
                continue
            src = ipaddress.IPv4Network(parts[parts.index("-s") + 1])
            if "MASQUERADE" in parts:
                found.append(src)
            elif "RETURN" in parts and "-d" in parts:
                exempt.setdefault(src, []).append(ipaddress.IPv4Network(parts[parts.index("-d") + 1]))
        return [Masquerade(s, tuple(sorted(exempt.get(s, ())))) for s in found]

    def _ensure_chains(self) -> None:
        for table, chain, hook in (("nat", self.nat, "POSTROUTING"), ("filter", self.fwd, "FORWARD")):
            if self._run("-t", table, "-S", chain, check=False).returncode != 0:
                self._run("-t", table, "-N", chain)
            jump = ["-m", "comment", "--comment", self.comment, "-j", chain]
            if self._run("-t", table, "-C", hook, *jump, check=False).returncode != 0:
                self._run("-t", table, "-I", hook, "1", *jump)
        sysctl("net/ipv4/ip_forward", "1")

    def add(self, subnet: ipaddress.IPv4Network, exempt: tuple[ipaddress.IPv4Network, ...] = ()) -> None:
        self._ensure_chains()
        for dst in exempt:  # inserted first, so they come before any MASQUERADE of the subnet
            rule = self._exempt_rule(subnet, dst)
            if self._run("-t", "nat", "-C", self.nat, *rule, check=False).returncode != 0:
                self._run("-t", "nat", "-I", self.nat, "1", *rule)
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            if self._run("-t", table, "-C", chain, *rule, check=False).returncode != 0:
                self._run("-t", table, "-A", chain, *rule)

    def remove(self, subnet: ipaddress.IPv4Network, exempt: tuple[ipaddress.IPv4Network, ...] = ()) -> None:
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            self._run("-t", table, "-D", chain, *rule, check=False)
        for dst in exempt:
            self._run("-t", "nat", "-D", self.nat, *self._exempt_rule(subnet, dst), check=False)

    def teardown(self) -> bool:
        """Remove our chains and the jumps to them; True if anything was there."""
        found = False
        for table, chain, hook in (("nat", self.nat, "POSTROUTING"), ("filter", self.fwd, "FORWARD")):
            jump = ["-m", "comment", "--comment", self.comment, "-j", chain]
            while self._run("-t", table, "-D", hook, *jump, check=False).returncode == 0:
                found = True
            if self._run("-t", table, "-F", chain, check=False).returncode == 0:
                self._run("-t", table, "-X", chain, check=False)
                found = True
        return found


class _Masquerades:
    kind = Masquerade.kind

    def __init__(self, iptables: Iptables) -> None:
        self.iptables = iptables

    def observe(self, key: Key) -> Masquerade | None:
        subnet = ipaddress.IPv4Network(key[1])
        return next((m for m in self.iptables.masquerades() if m.subnet == subnet), None)

    def observe_all(self) -> Iterable[Masquerade]:
        return self.iptables.masquerades()

    def add(self, obj: Masquerade) -> None:
        self.iptables.add(obj.subnet, obj.exempt)

    def change(self, old: Masquerade, new: Masquerade) -> None:
        # The new exemptions first (RETURN rules), then the stale ones go: never a moment in
        # which cluster traffic is masqueraded that should not be.
        self.iptables.add(new.subnet, new.exempt)
        for dst in set(old.exempt) - set(new.exempt):
            self.iptables._run("-t", "nat", "-D", self.iptables.nat,
                               *self.iptables._exempt_rule(old.subnet, dst), check=False)

    def remove(self, obj: Masquerade) -> None:
        self.iptables.remove(obj.subnet, obj.exempt)
