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

    def subnets(self) -> list[ipaddress.IPv4Network]:
        try:
            out = self._run("-t", "nat", "-S", self.nat, check=False)
        except FileNotFoundError:
            return []
        found = []
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["-A", self.nat] and "-s" in parts and "MASQUERADE" in parts:
                found.append(ipaddress.IPv4Network(parts[parts.index("-s") + 1]))
        return found

    def _ensure_chains(self) -> None:
        for table, chain, hook in (("nat", self.nat, "POSTROUTING"), ("filter", self.fwd, "FORWARD")):
            if self._run("-t", table, "-S", chain, check=False).returncode != 0:
                self._run("-t", table, "-N", chain)
            jump = ["-m", "comment", "--comment", self.comment, "-j", chain]
            if self._run("-t", table, "-C", hook, *jump, check=False).returncode != 0:
                self._run("-t", table, "-I", hook, "1", *jump)
        sysctl("net/ipv4/ip_forward", "1")

    def add(self, subnet: ipaddress.IPv4Network) -> None:
        self._ensure_chains()
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            if self._run("-t", table, "-C", chain, *rule, check=False).returncode != 0:
                self._run("-t", table, "-A", chain, *rule)

    def remove(self, subnet: ipaddress.IPv4Network) -> None:
        for table, rule in self._rules(subnet):
            chain = self.nat if table == "nat" else self.fwd
            self._run("-t", table, "-D", chain, *rule, check=False)

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
        return Masquerade(subnet) if subnet in self.iptables.subnets() else None

    def observe_all(self) -> Iterable[Masquerade]:
        return [Masquerade(s) for s in self.iptables.subnets()]

    def add(self, obj: Masquerade) -> None:
        self.iptables.add(obj.subnet)

    def change(self, old: Masquerade, new: Masquerade) -> None:
        self.remove(old)
        self.add(new)

    def remove(self, obj: Masquerade) -> None:
        self.iptables.remove(obj.subnet)
