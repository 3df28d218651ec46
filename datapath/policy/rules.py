"""The policy language as frozen values: rules, peer rules, port ranges, and the Scope (plain
rule, CNP of a namespace, CCNP) a rule is read in. Pure; imports no policy module but selectors
and l7 (and datapath.cidr for the CIDR peers). What a `toServices` name stands for comes from
outside as a ServicePeer (datapath.services.ServiceTarget is one), never from here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from datapath.cidr import CidrSelector, IPNetwork
from datapath.errors import InvalidRequest
from datapath.labels import ANY, RESERVED, Label
from datapath.policy.l7 import L7Rules
from datapath.policy.selectors import NAMESPACE_KEY, NAMESPACE_LABELS, Requirement, Selector

CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"


@dataclass(frozen=True)
class Scope:
    """Where a rule comes from: a plain rule list (kind ""), or a CiliumNetworkPolicy of a
    namespace, or a CiliumClusterwideNetworkPolicy."""

    kind: str = ""
    namespace: str = ""

    def subject(self, sel: Selector, where: str) -> Selector:
        """The endpointSelector in force: no reserved identity but init; a CNP's own namespace only."""
        if not self.kind and not sel.reserved:
            return sel
        for name in sel.reserved:
            if name != "init":
                raise InvalidRequest(f"{where}: selects reserved:{name}: {_UNENFORCED.get(name, _NOT_AN_ENDPOINT)}")
            if self.kind == CNP:
                raise InvalidRequest(f"{where}: a CiliumNetworkPolicy cannot select reserved:init (endpoints whose "
                                     "labels are not known yet have no namespace); use a "
                                     "CiliumClusterwideNetworkPolicy")
        if not self.kind:
            return sel
        sel = self._namespaced(sel, where)
        if self.kind == CNP:
            probe = frozenset({Label("k8s", NAMESPACE_KEY, self.namespace)})
            if not all(r.matches(probe) for r in sel.requirements if r.namespace):
                raise InvalidRequest(f"{where}: a CiliumNetworkPolicy of namespace {self.namespace!r} applies to "
                                     f"endpoints of namespace {self.namespace!r} only, and this selects another "
                                     "(use a CiliumClusterwideNetworkPolicy)")
            sel = self._in_namespace(sel)
        return sel

    def peer(self, sel: Selector, where: str, entities: str) -> Selector:
        """A fromEndpoints/toEndpoints/Requires selector in force: in a CNP, endpoints of its
        namespace unless it names a namespace itself (as Cilium's ParseToCiliumRule)."""
        if not self.kind:
            return sel
        if sel.reserved:
            raise InvalidRequest(f"{where}: selects reserved:{sel.reserved[0]}, but the endpoint selectors of a "
                                 f"{self.kind} select endpoints only; name reserved identities with {entities} "
                                 f"(e.g. {entities}: [{_ENTITY_OF.get(sel.reserved[0], 'host')}])")
        sel = self._namespaced(sel, where)
        if self.kind == CNP and not any(r.namespace for r in sel.requirements):
            sel = self._in_namespace(sel)
        return sel

    @staticmethod
    def _namespaced(sel: Selector, where: str) -> Selector:
        """Requirements on io.kubernetes.pod.namespace (any source, `k8s:` included) become
        requirements on the endpoint's namespace."""
        if not any(r.key == NAMESPACE_KEY or r.key.startswith(NAMESPACE_LABELS) for r in sel.requirements):
            return sel
        reqs = []
        for r in sel.requirements:
            if r.key.startswith(NAMESPACE_LABELS):
                raise InvalidRequest(f"{where}: selecting namespaces by their labels ({r.key}) is not supported: "
                                     "cellgate knows no namespace labels")
            reqs.append(dataclasses.replace(r, source=ANY, namespace=True) if r.key == NAMESPACE_KEY
                        and r.source != RESERVED else r)
        return Selector(tuple(reqs), sel.raw)

    def _in_namespace(self, sel: Selector) -> Selector:
        raw = dict(sel.raw or {})
        raw["matchLabels"] = {**(raw.get("matchLabels") or {}), f"k8s:{NAMESPACE_KEY}": self.namespace}
        req = Requirement(ANY, NAMESPACE_KEY, "In", (self.namespace,), namespace=True)
        return Selector((*sel.requirements, req), raw)


PLAIN = Scope()
_NOT_AN_ENDPOINT = "it is no endpoint and cellgate does not enforce policy for it (only endpoints and " \
                   "reserved:init can be a rule's subject)"
_UNENFORCED = {
    "host": "policy for the host itself (host policies) is not supported yet",
    "ingress": "Ingress/Gateway API endpoints (reserved:ingress) are not supported: cellgate has no ingress gateway",
    "health": "cellgate has no health endpoint and does not enforce policy for it",
}
_ENTITY_OF = {"host": "host", "world": "world", "init": "init", "remote-node": "remote-node",
              "unmanaged": "unmanaged"}


# -- rules -----------------------------------------------------------------------------------

ENTITIES = ("host", "world", "all", "init", "cluster", "remote-node", "unmanaged")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58, "ANY": 0}
PORTED = (6, 17, 132)
MAX_PORTS = 40  # per port rule, as Cilium
NOT_YET = {
    "toFQDNs": "FQDN rules", "fromNodes": "node rules", "toNodes": "node rules",
    "icmps": "ICMP field rules (use toPorts with protocol ICMP and the type as port)",
    "fromGroups": "group rules", "toGroups": "group rules", "authentication": "authentication rules (mutual TLS)",
}


@dataclass(frozen=True)
class PortRange:
    protocol: int  # IPPROTO_*, 0 = any
    first: int  # 0 = every port (or every ICMP type)
    last: int
    l7: L7Rules | None = None  # the toPorts entry's `rules` (TCP with a port only); None = L4 only

    def __str__(self) -> str:
        proto = next((k for k, v in PROTOCOLS.items() if v == self.protocol), str(self.protocol))
        if self.first == 0:
            return proto if self.protocol else "ANY"
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{ports}/{proto}" + (f"+{self.l7.kind}" if self.l7 is not None else "")


@dataclass(frozen=True)
class PeerRule:
    """One entry of ingress/egress/ingressDeny/egressDeny."""

    endpoints: tuple[Selector, ...] = ()
    requires: tuple[Selector, ...] = ()
    entities: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()  # empty: every port and protocol
    nobody: bool = False  # an empty list of peers was given (`fromEndpoints: []`): it selects no peer
    cidrs: tuple[CidrSelector, ...] = ()  # fromCIDR/fromCIDRSet/toCIDR/toCIDRSet: addresses outside the cluster
    services: tuple[str, ...] = ()  # toServices: the names of services whose backends are the peers

    @property
    def has_l3(self) -> bool:
        """Names its peers (maybe none). Without them, ports apply to any peer, and no ports means nothing."""
        return bool(self.endpoints or self.entities or self.cidrs or self.services or self.nobody)


@dataclass(frozen=True)
class Rule:
    selector: Selector
    ingress: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    labels: tuple[Label, ...] = ()
    description: str = ""
    spec: Any = field(default=None, compare=False, repr=False)  # the rule as given (decoded JSON)
    id: int = 0  # assigned by the repository
    enable_default_deny: tuple[bool | None, bool | None] = (None, None)  # (ingress, egress); None = as Cilium
    scope: Scope = PLAIN  # a plain rule, or the CRD (and namespace) it came from

    def default_deny(self, egress: bool) -> bool:
        """Whether this rule puts its endpoints into default deny in a direction (Cilium's rule:
        yes if it has allow or deny entries there, unless enableDefaultDeny says otherwise)."""
        explicit = self.enable_default_deny[1 if egress else 0]
        has_rules = bool(self.egress or self.egress_deny) if egress else bool(self.ingress or self.ingress_deny)
        return has_rules if explicit is None else explicit and has_rules

    def numbered(self, number: int) -> Rule:
        """This rule under the repository's id: a shallow copy of its attributes (dataclasses.
        replace re-runs __init__, copy.copy goes through __reduce_ex__; either took a fifth of
        a 1k-rule import)."""
        twin = object.__new__(Rule)
        twin.__dict__.update(self.__dict__, id=number)
        return twin

    @property
    def kind(self) -> str:
        return self.scope.kind

    @property
    def namespace(self) -> str:
        return self.scope.namespace

    @property
    def document(self) -> Any:
        """What imports this rule again with the same meaning: the rule as given, inside its CRD
        (with its namespace) if it came from one. `policy get` shows this."""
        if not self.scope.kind:
            return self.spec
        metadata = {"namespace": self.scope.namespace} if self.scope.namespace else {}
        return {"apiVersion": "cilium.io/v2", "kind": self.scope.kind, "metadata": metadata, "spec": self.spec}

    @functools.cached_property
    def raw(self) -> str:
        """Canonical JSON of the rule as given (made on demand: only unlabelled rules need it)."""
        return json.dumps(self.document or {}, sort_keys=True, separators=(",", ":"))

    @property
    def name(self) -> str:
        if self.labels:
            return ",".join(f"{lb.key}={lb.value}" for lb in self.labels)
        return f"rule {self.id}"


class ServicePeer(Protocol):
    """What `toServices` of one service allows: the endpoints its selector matches (a service
    that selects its backends by labels), else its backends' addresses as /32 and /128 prefixes,
    which are CIDR peers (and so need their CIDR identities). datapath.services.ServiceTarget."""

    @property
    def selector(self) -> Selector | None: ...

    @property
    def prefixes(self) -> tuple[IPNetwork, ...]: ...


ServicePeers = Mapping[str, ServicePeer]  # by service name; a name that is absent allows nothing
NO_SERVICES: ServicePeers = {}


def named_services(rules: Iterable[Rule]) -> set[str]:
    """The names of the services `toServices` entries of `rules` name."""
    return {name for rule in rules for section in (rule.ingress, rule.egress, rule.ingress_deny, rule.egress_deny)
            for pr in section for name in pr.services}


def named_prefixes(rules: Iterable[Rule], services: ServicePeers = NO_SERVICES) -> set[IPNetwork]:
    """Every prefix the CIDR peers of `rules` name (cidrs and excepts), and the backend addresses
    of the services their toServices entries name (of `services`): each needs its identity."""
    out: set[IPNetwork] = set()
    for rule in rules:
        for section in (rule.ingress, rule.egress, rule.ingress_deny, rule.egress_deny):
            for pr in section:
                for sel in pr.cidrs:
                    out.update(sel.prefixes)
                for name in pr.services:
                    target = services.get(name)
                    if target is not None:
                        out.update(target.prefixes)
    return out
