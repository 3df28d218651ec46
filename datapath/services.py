"""Load-balanced services: frontends (VIP:port/proto), backends by address or by labels, their
validation, and the backends a label selector resolves to. Pure: standard library and datapath only.

A service's kernel form (datapath.plan.LbService) is computed here from its spec and the
endpoints the node knows (local ones and the cluster's ipcache); datapath.kernel.lb writes it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import InvalidRequest
from datapath.labels import Label, LabelSet
from datapath.policy.selectors import Selector, parse_selector

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
MAX_SERVICES = 65536  # bpf/lib/lb.h CG_LB_MAX_SERVICES
MAX_BACKENDS = 262144  # every service's backends together (CG_LB_MAX_BACKENDS)
MAX_SERVICE_BACKENDS = 4096  # one service's; more is refused as a whole
NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_FRONTEND = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})"
                       r"(?:/(?P<proto>[A-Za-z]+))?$")
_LABEL = re.compile(r"^(?:(?P<source>[a-z0-9-]+):)?(?P<key>[A-Za-z0-9][A-Za-z0-9._/-]{0,252})"
                    r"=(?P<value>[A-Za-z0-9._-]{0,63})$")


@dataclass(frozen=True, order=True)
class Frontend:
    address: IPAddress
    port: int
    proto: int = 6

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{PROTO_NAMES.get(self.proto, str(self.proto))}"

    @classmethod
    def parse(cls, text: str) -> Frontend:
        match = _FRONTEND.match(text.strip())
        if match is None:
            raise InvalidRequest(f"frontend {text!r}: expected VIP:PORT[/tcp|udp] ([IPv6]:PORT for IPv6)")
        proto_text = (match.group("proto") or "tcp").lower()
        if proto_text not in PROTOCOLS:
            raise InvalidRequest(f"frontend {text!r}: protocol {proto_text!r} is not tcp or udp")
        address = _address(match.group("v4") or match.group("v6"), f"frontend {text!r}")
        return cls(address, _port(match.group("port"), f"frontend {text!r}"), PROTOCOLS[proto_text])


@dataclass(frozen=True, order=True)
class Backend:
    address: IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"

    def sort_key(self) -> tuple[int, int, int]:
        """An order across families (addresses of two families do not compare)."""
        return (self.address.version, int(self.address), self.port)

    @classmethod
    def parse(cls, text: str, where: str = "backend") -> Backend:
        match = _FRONTEND.match(text.strip())
        if match is None or match.group("proto"):
            raise InvalidRequest(f"{where} {text!r}: expected IP:PORT ([IPv6]:PORT for IPv6)")
        address = _address(match.group("v4") or match.group("v6"), f"{where} {text!r}")
        return cls(address, _port(match.group("port"), f"{where} {text!r}"))


def _address(text: str, where: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRequest(f"{where}: {text!r} is not an IP address") from None
    for kind, flag in (("unspecified", address.is_unspecified), ("multicast", address.is_multicast),
                       ("loopback", address.is_loopback), ("link-local", address.is_link_local)):
        if flag:
            raise InvalidRequest(f"{where}: {address} is a {kind} address, not one a service can use")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidRequest(f"{where}: {address} is the broadcast address")
    return address


def _port(text: str, where: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"{where}: port {port} is not in 1..65535")
    return port


def parse_label_selector(text: str) -> tuple[Selector, tuple[str, ...]]:
    """`app=web[,tier=db]` (each `[source:]key=value`): the endpoints carrying every label.
    Returns the policy selector and the canonical terms."""
    terms = [t.strip() for t in text.split(",") if t.strip()]
    if not terms:
        raise InvalidRequest("selector: give at least one label, e.g. app=web")
    if len(terms) > 16:
        raise InvalidRequest(f"selector: {len(terms)} labels; at most 16")
    match_labels: dict[str, str] = {}
    canonical = []
    for term in terms:
        m = _LABEL.match(term)
        if m is None:
            raise InvalidRequest(f"selector term {term!r}: expected key=value or source:key=value "
                                 "(set operators such as `in`, `!=` or `~` are not supported)")
        source = m.group("source") or "any"
        key = f"{source}:{m.group('key')}" if m.group("source") else m.group("key")
        if key in match_labels and match_labels[key] != m.group("value"):
            raise InvalidRequest(f"selector: label {key} given twice with different values")
        match_labels[key] = m.group("value")
        canonical.append(f"{source}:{m.group('key')}={m.group('value')}")
    selector = parse_selector({"matchLabels": match_labels}, "selector")
    return selector, tuple(sorted(set(canonical)))


@dataclass(frozen=True)
class ServiceSpec:
    """What the operator asked for. Exactly one of `backends` and `selector` is set."""

    name: str
    frontend: Frontend
    backends: tuple[Backend, ...] = ()
    selector: tuple[str, ...] = ()  # canonical `source:key=value` terms
    target_port: int = 0  # with a selector: the backends' port
    node: str = ""  # the owning node (cluster: whose lease keeps it)
    id: int = 0  # reverse-NAT index, 1..MAX_SERVICES, given by the owner

    @property
    def by_labels(self) -> bool:
        return bool(self.selector)

    @property
    def label_selector(self) -> Selector | None:
        if not self.selector:
            return None
        return _selector_of(self.selector)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "frontend": str(self.frontend), "backends": [str(b) for b in self.backends],
                "selector": ",".join(t.removeprefix("any:") for t in self.selector), "target_port": self.target_port,
                "node": self.node, "id": self.id}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "service") -> ServiceSpec:
        """Our own documents (state files, the kvstore): strict, and validated as a request is."""
        if not isinstance(doc, Mapping):
            raise InvalidRequest(f"{where}: not an object")
        unknown = set(doc) - {"name", "frontend", "backends", "selector", "target_port", "node", "id"}
        if unknown:
            raise InvalidRequest(f"{where}: unknown field {sorted(unknown)[0]!r}")
        spec = parse_request(doc, where)
        number = doc.get("id", 0)
        node = doc.get("node", "")
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_SERVICES:
            raise InvalidRequest(f"{where}: bad id {number!r}")
        if not isinstance(node, str) or len(node) > 63:
            raise InvalidRequest(f"{where}: bad node {node!r}")
        return ServiceSpec(spec.name, spec.frontend, spec.backends, spec.selector, spec.target_port, node, number)


def _selector_of(terms: tuple[str, ...]) -> Selector:
    return parse_label_selector(",".join(terms))[0]


def default_name(frontend: Frontend) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(frontend).lower()).strip("-")


def parse_request(body: Mapping[str, Any], where: str = "service") -> ServiceSpec:
    """A create/update request (REST body, CLI): frontend, and backends or selector + target_port."""
    if not isinstance(body, Mapping):
        raise InvalidRequest(f"{where}: the body must be a JSON object")
    frontend_text = body.get("frontend")
    if not isinstance(frontend_text, str):
        raise InvalidRequest(f"{where}: frontend (VIP:PORT[/tcp|udp]) is required")
    frontend = Frontend.parse(frontend_text)
    name = body.get("name") or default_name(frontend)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"{where}: name {name!r} must be 1-63 lower-case letters, digits, '.' or '-'")
    # null (or "", as the CLI may send) is none; any other falsy value ({}, 0, []) is a value to judge
    raw_backends = [] if body.get("backends") in (None, "") else body["backends"]
    selector_text = "" if body.get("selector") is None else body["selector"]
    target_port = 0 if body.get("target_port") is None else body["target_port"]
    if isinstance(raw_backends, str):
        raw_backends = [b for b in raw_backends.split(",") if b.strip()]
    if not isinstance(raw_backends, list) or not all(isinstance(b, str) for b in raw_backends):
        raise InvalidRequest(f"{where}: backends must be a list of IP:PORT strings")
    if not isinstance(selector_text, str):
        raise InvalidRequest(f"{where}: selector must be a string such as app=web")
    if raw_backends and selector_text:
        raise InvalidRequest(f"{where}: give backends or a selector, not both")
    if not isinstance(target_port, int) or isinstance(target_port, bool):
        raise InvalidRequest(f"{where}: target_port must be a number")
    if len(raw_backends) > MAX_SERVICE_BACKENDS:
        raise InvalidRequest(f"{where}: {len(raw_backends)} backends; a service has at most {MAX_SERVICE_BACKENDS}")
    if selector_text:
        _, terms = parse_label_selector(selector_text)
        if not 1 <= target_port <= 65535:
            raise InvalidRequest(f"{where}: a selector needs --target-port in 1..65535 (got {target_port})")
        return ServiceSpec(name, frontend, (), terms, target_port)
    if target_port:
        raise InvalidRequest(f"{where}: target_port goes with a selector; backends name their own ports")
    backends = tuple(Backend.parse(b, f"{where} backend") for b in raw_backends)
    if len(set(backends)) != len(backends):
        dup = next(b for b in backends if backends.count(b) > 1)
        raise InvalidRequest(f"{where}: backend {dup} is listed twice")
    for b in backends:
        if b.address.version != frontend.address.version:
            raise InvalidRequest(f"{where}: backend {b} is IPv{b.address.version}, the frontend IPv"
                                 f"{frontend.address.version}")
        if b.address == frontend.address:
            raise InvalidRequest(f"{where}: backend {b} is the frontend's own address")
    return ServiceSpec(name, frontend, backends)


def check_frontend(frontend: Frontend, reserved: Iterable[IPNetwork], host_addresses: Iterable[IPAddress]) -> None:
    """Refuse a VIP that is an endpoint range's (a pod address) or the host's own address."""
    for net in reserved:
        if net.version == frontend.address.version and frontend.address in net:
            raise InvalidRequest(f"frontend {frontend}: {frontend.address} is inside the endpoint range {net}; "
                                 "a VIP must be an address nobody else owns")
    if frontend.address in set(host_addresses):
        raise InvalidRequest(f"frontend {frontend}: {frontend.address} is an address of this host")


# -- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An address a selector may pick: a local endpoint's or a remote one's (from the ipcache)."""

    address: IPAddress
    labels: LabelSet
    node: str = ""  # "" = this node


def resolve(spec: ServiceSpec, candidates: Iterable[Candidate]) -> tuple[Backend, ...]:
    """The service's backends, in a stable order (so a re-resolution that finds the same set
    writes nothing)."""
    if not spec.by_labels:
        return spec.backends
    selector = spec.label_selector
    assert selector is not None
    family = spec.frontend.address.version
    found = {Backend(c.address, spec.target_port) for c in candidates
             if c.address.version == family and selector.matches(c.labels)}
    return tuple(sorted(found, key=Backend.sort_key))[:MAX_SERVICE_BACKENDS]


@dataclass(frozen=True)
class ServiceState:
    """A service as the node balances it: its spec and the backends it resolved to."""

    spec: ServiceSpec
    backends: tuple[Backend, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        doc = self.spec.to_json()
        doc["active_backends"] = [str(b) for b in self.backends]
        return doc


def labels_of(texts: Sequence[str]) -> LabelSet:
    return frozenset(Label.parse(t) for t in texts)


# -- what policy sees of a service (toServices) ---------------------------------------------


@dataclass(frozen=True)
class ServiceTarget:
    """What a policy's `toServices` naming this service allows (a datapath.policy.rules.ServicePeer):
    the endpoints its selector matches, or else its backends' addresses, as /32 and /128 prefixes."""

    name: str
    selector: Selector | None = None
    addresses: tuple[IPAddress, ...] = ()
    prefixes: tuple[IPNetwork, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(ipaddress.ip_network(a) for a in self.addresses))

    @classmethod
    def of(cls, spec: ServiceSpec) -> ServiceTarget:
        if spec.by_labels:
            return cls(spec.name, spec.label_selector)
        addresses = sorted({b.address for b in spec.backends}, key=lambda a: (a.version, int(a)))
        return cls(spec.name, None, tuple(addresses))
