"""The Agent: every use case of the node, one class (networks and endpoints in
plugin.service.endpoints, restore and reconciliation in plugin.service.restore, policy here).

The doors call only its public methods; the small query methods at the end are the
read-only views they need (never the lock, the adapters or the dicts themselves).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from datapath import cidr, plan
from datapath import identity as ids
from datapath.errors import InvalidRequest, NotFound
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint, Network
from datapath.policy import Rule
from datapath.policy.compile import PolicyKey, PolicyValue
from datapath.policy.fromflows import Case
from datapath.policy.trace import L7Request, Party, TraceResult, parse_dport
from ipam.pool import Pool
from plugin.service.services import AgentServices

log = logging.getLogger(__name__)

HYPOTHETICAL = 0x7FFF0000  # identity of labels no endpoint has yet, for traces only


class Agent(AgentServices):
    """Everything the agent does, behind one lock."""

    # -- policy -----------------------------------------------------------------------------

    def policy_import(self, rules: list[Rule]) -> int:
        """Import rules; CIDR prefixes get their identity's entries before their ipcache entry."""
        with self._lock:
            return self.policy.import_rules(rules, list(self.endpoints.values()), self._converge)

    def policy_delete(self, labels: list[Label] | None) -> tuple[int, int]:
        with self._lock:
            return self.policy.delete_rules(labels, list(self.endpoints.values()), self._converge)

    def party(self, kind: str, value: str) -> Party:
        """A side of a trace: an endpoint (ID prefix, interface, address), an identity, labels, or
        an address (`ip`), resolved as the datapath does."""
        with self._lock:
            if kind == "ip":
                return self._address_party(value)
            if kind == "endpoint":
                ep = self.find_endpoint(value)
                return Party(ep.identity, self._labels_for(ep.identity) or ep.label_set, True)
            if kind == "identity":
                try:
                    number = int(value)
                except ValueError:
                    raise InvalidRequest(f"identity must be a number, got {value!r}") from None
                labels = self._labels_for(number)
                if labels is None:
                    raise NotFound(f"unknown identity {number}")
                return Party(number, labels, self._is_local(number))
            if kind == "labels":
                try:
                    labels = frozenset(Label.parse(t.strip(), "container") for t in value.split(",") if t.strip())
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
                if not labels:
                    raise InvalidRequest("give at least one label, e.g. app=frontend")
                number = self.policy.identities.number_of(labels)
                if number is None:
                    return Party(HYPOTHETICAL, labels, True)  # as an endpoint with these labels would be
                return Party(number, labels, number >= ids.FIRST_ALLOCATED or self._is_local(number))
            raise InvalidRequest(f"unknown trace party kind {kind!r}")

    def _address_party(self, text: str) -> Party:
        """An address as the datapath sees it: a local endpoint's (its own policy applies), else
        the longest ipcache prefix holding it (host, remote endpoint, CIDR identity), else world."""
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            raise InvalidRequest(f"ip: {text!r} is not an IPv4 or IPv6 address") from None
        for ep in self.endpoints.values():
            if any(a.ip == address for a in ep.addresses):
                return Party(ep.identity, self._labels_for(ep.identity) or ep.label_set, True, str(address))
        ipcache = {o.prefix: o.identity for o in self._desired() if isinstance(o, plan.IpcacheEntry)}
        _, number = cidr.resolve(address, ipcache)
        labels = self._labels_for(number) or frozenset()
        return Party(number, labels, False, str(address))

    def _labels_for(self, number: int) -> LabelSet | None:
        return self.policy.identity_labels(number)

    def policy_preview(self, new: list[Rule], cases: list[Case]) -> dict[Case, tuple[bool, bool]]:
        """Each observed case judged by the policy in force and by it with `new` imported; the
        parties resolved by address as the datapath resolves them now. Changes nothing."""
        with self._lock:
            questions = [(self._address_party(c.src), self._address_party(c.dst), c.proto, c.port, c.request)
                         for c in cases]
            return dict(zip(cases, self.policy.preview(new, questions), strict=True))

    def is_local_identity(self, number: int) -> bool:
        with self._lock:
            return self._is_local(number)

    def _is_local(self, number: int) -> bool:
        return any(e.identity == number for e in self.endpoints.values())

    def trace(self, src: Party, dst: Party, dport: str, request: L7Request | None = None) -> TraceResult:
        try:
            proto, port = parse_dport(dport) if dport else (6, 0)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        with self._lock:
            if src.identity == dst.identity == HYPOTHETICAL:
                dst = Party(HYPOTHETICAL + 1, dst.labels, dst.local)
            return self.policy.trace(src, dst, proto, port, request)

    def set_trace(self, on: bool) -> None:
        with self._lock:
            self._trace = on
            self.kernel.set_config(on, self.timeouts, self._verdicts)

    def set_verdicts(self, on: bool) -> None:
        """Events for allowed new flows: only while a monitor listens for them (each costs a decode)."""
        with self._lock:
            self._verdicts = on
            self.kernel.set_config(self._trace, self.timeouts, on)

    # -- views ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "instance": self.settings.instance,
                "uptime": round(self._clock() - self.started, 3),
                "networks": len(self.networks),
                "endpoints": len(self.endpoints),
                "datapath": self.settings.program_revision,
                "ranges": {"ipv4": str(self.ipam.ranges.ipv4), "ipv6": str(self.ipam.ranges.ipv6)},
                "masquerade": self.settings.masquerade,
                # where services are balanced: the cgroup2 directory of the socket programs ("" none)
                # and the devices of the packet path
                "balancing": {"socket": self.settings.cgroup, "devices": list(self.settings.lb_devices)},
                "policy": {
                    "enforcement": self.policy.mode,
                    "revision": self.policy.repository.revision,
                    "realized": self.policy.realized_revision,
                    "rules": len(self.policy.repository.rules),
                    "entries": len(self.policy.applied),
                    "identities": len(self.policy.identities.allocated()),
                },
            }

    # -- read-only queries for the doors -----------------------------------------------------

    def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        return self.endpoints.get(endpoint_id)

    def list_endpoints(self) -> list[Endpoint]:
        """Every endpoint, oldest first."""
        return sorted(list(self.endpoints.values()), key=lambda e: e.created)

    def endpoint_count(self) -> int:
        return len(self.endpoints)

    def endpoint_on(self, ifname: str) -> str:
        """The ID of the endpoint whose host interface is `ifname` ("" if none)."""
        return next((e.id for e in list(self.endpoints.values()) if e.host_ifname == ifname), "")

    def list_networks(self) -> list[tuple[Network, int]]:
        """Every network with the number of its endpoints."""
        counts: dict[str, int] = {}
        for ep in list(self.endpoints.values()):
            counts[ep.network_id] = counts.get(ep.network_id, 0) + 1
        return [(n, counts.get(n.id, 0)) for n in list(self.networks.values())]

    def realized_policy(self, ep: Endpoint) -> dict[str, Any]:
        """What the datapath enforces for an endpoint."""
        return {
            "enforcement": self.policy.enforcement_of(ep),
            "revision": self.policy.realized_revision,
            "entries": len(self.policy.entries_of(ep.identity)),
            "identity_labels": self.policy.labels_of(ep.identity),
        }

    def policy_rules(self, labels: list[Label] | None) -> tuple[int, list[Rule]]:
        """The repository's revision and its rules with all of `labels` (all rules for None)."""
        revision, _ = self.policy.repository.snapshot()
        return revision, self.policy.repository.select(labels)

    def policy_revisions(self) -> tuple[int, int]:
        """(revision the datapath enforces, latest revision of the repository)."""
        return self.policy.realized_revision, self.policy.repository.revision

    def labels_of(self, number: int) -> list[str]:
        return self.policy.labels_of(number)

    def endpoint_addresses(self) -> dict[str, str]:
        """Every local endpoint's addresses → its ID (for naming the parties of flows)."""
        with self._lock:
            return {str(a.ip): ep.id for ep in self.endpoints.values() for a in ep.addresses}

    def service_names(self) -> dict[tuple[str, int, int], str]:
        """(address, port, protocol) of every service frontend and backend → the service's name."""
        with self._lock:
            return self.services.names_by_address()

    def identity_list(self) -> list[tuple[int, list[str], int]]:
        """Every identity (number, labels, endpoints holding it), by number."""
        counts: dict[int, int] = {}
        for ep in list(self.endpoints.values()):
            counts[ep.identity] = counts.get(ep.identity, 0) + 1
        return [(number, sorted(str(x) for x in labels), counts.get(number, 0))
                for number, labels in sorted(self.policy.all_identities().items())]

    def identity(self, number: int) -> tuple[list[str], int]:
        """The labels of an identity and how many endpoints hold it."""
        labels = self.policy.identity_labels(number)
        if labels is None:
            raise NotFound(f"unknown identity {number}")
        owners = sum(1 for e in list(self.endpoints.values()) if e.identity == number)
        return sorted(str(x) for x in labels), owners

    def policy_entries(self, ep: Endpoint) -> list[tuple[PolicyKey, PolicyValue, list[str]]]:
        """The policy map entries of an endpoint's identity, with the labels of each peer."""
        return [(k, v, self.policy.labels_of(k.peer) if k.peer else ["any"])
                for k, v in self.policy.entries_of(ep.identity)]

    def ipcache_entries(self) -> list[plan.IpcacheEntry]:
        """The kernel's ipcache as it is (host addresses, CIDR identities, remote endpoints)."""
        return [o for o in self.kernel.observe() if isinstance(o, plan.IpcacheEntry)]

    def counters(self) -> dict[int, tuple[int, int]]:
        return self.kernel.counters()

    def directed_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        return self.kernel.directed_counters()

    def map_pressure(self) -> dict[str, float]:
        return self.kernel.map_pressure()

    def proxy_redirects(self) -> dict[str, int]:
        """Policy entries that send flows to the L7 proxy, by protocol (http, kafka)."""
        with self._lock:
            out: dict[str, int] = {}
            for value in self.policy.applied.values():
                if value.l7 and value.filter is not None:
                    out[value.filter.kind] = out.get(value.filter.kind, 0) + 1
            return out

    def ct_entries(self) -> list[tuple[Any, Any]]:
        return self.kernel.ct_entries()

    def ipam_pools(self) -> tuple[dict[str, str], list[Pool]]:
        """The host's ranges and every pool."""
        ranges = {"ipv4": str(self.ipam.ranges.ipv4), "ipv6": str(self.ipam.ranges.ipv6)}
        return ranges, self.ipam.pools()
