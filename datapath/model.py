"""Networks and endpoints as the agent knows them: frozen values with their on-disk form.

Standard library only. Names and MACs are derived from IDs (datapath.naming), so the same
endpoint always maps to the same kernel objects.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datapath import naming
from datapath.labels import Label, LabelSet

INIT = 5  # datapath.identity.INIT; the identity of an endpoint whose labels are not known yet

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Network:
    """A Docker network (or CNI network name) served by cellgate."""

    id: str
    gateways: tuple[IPInterface, ...]  # gateway address with the subnet's prefix length
    created: float = 0.0
    name: str = ""

    @property
    def origin(self) -> str:
        """"cni" for a network a CNI configuration made (its ID derives from its name), else "docker"."""
        return "cni" if self.name and self.id == naming.cni_network_id(self.name) else "docker"

    def gateway_for(self, address: IPInterface) -> IPInterface | None:
        for gw in self.gateways:
            if gw.version == address.version and address.ip in gw.network:
                return gw
        return None

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": 1,
            "id": self.id,
            "name": self.name,
            "gateways": [str(g) for g in self.gateways],
            "created": self.created,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Network:
        return cls(
            id=str(doc["id"]),
            gateways=tuple(ipaddress.ip_interface(g) for g in doc.get("gateways", [])),
            created=float(doc.get("created", 0.0)),
            name=str(doc.get("name", "")),
        )


@dataclass(frozen=True)
class Endpoint:
    """One interface of one container, with everything the datapath needs to serve it."""

    id: str
    network_id: str
    host_ifname: str
    peer_ifname: str
    mac: str  # container side
    host_mac: str  # host side; the container sees it as its gateway's MAC
    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None
    gateway4: ipaddress.IPv4Address | None = None
    gateway6: ipaddress.IPv6Address | None = None
    sandbox: str = ""  # Docker SandboxKey (or CNI netns) once joined
    created: float = 0.0
    origin: str = "docker"
    labels: tuple[str, ...] = ()  # `source:key=value`, sorted; empty until the runtime told us
    identity: int = INIT  # security identity; init until the labels are known
    labels_known: bool = False
    container_id: str = ""  # CNI attachment: (container ID, interface name)
    ifname: str = ""

    @property
    def label_set(self) -> LabelSet:
        return frozenset(Label.parse(text) for text in self.labels)

    @property
    def addresses(self) -> tuple[IPInterface, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a is not None)

    @property
    def sandbox_hash(self) -> int:
        """32-bit tag shared by the endpoints of one container (0 = not joined)."""
        if not self.sandbox:
            return 0
        return zlib.crc32(self.sandbox.encode()) or 1

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": 1,
            "id": self.id,
            "network_id": self.network_id,
            "host_ifname": self.host_ifname,
            "peer_ifname": self.peer_ifname,
            "mac": self.mac,
            "host_mac": self.host_mac,
            "ipv4": str(self.ipv4) if self.ipv4 else "",
            "ipv6": str(self.ipv6) if self.ipv6 else "",
            "gateway4": str(self.gateway4) if self.gateway4 else "",
            "gateway6": str(self.gateway6) if self.gateway6 else "",
            "sandbox": self.sandbox,
            "created": self.created,
            "origin": self.origin,
            "labels": list(self.labels),
            "identity": self.identity,
            "labels_known": self.labels_known,
            "container_id": self.container_id,
            "ifname": self.ifname,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Endpoint:
        def opt(key: str, conv: Any) -> Any:
            value = doc.get(key) or ""
            return conv(value) if value else None

        return cls(
            id=str(doc["id"]),
            network_id=str(doc["network_id"]),
            host_ifname=str(doc["host_ifname"]),
            peer_ifname=str(doc["peer_ifname"]),
            mac=str(doc["mac"]),
            host_mac=str(doc["host_mac"]),
            ipv4=opt("ipv4", ipaddress.IPv4Interface),
            ipv6=opt("ipv6", ipaddress.IPv6Interface),
            gateway4=opt("gateway4", ipaddress.IPv4Address),
            gateway6=opt("gateway6", ipaddress.IPv6Address),
            sandbox=str(doc.get("sandbox", "")),
            created=float(doc.get("created", 0.0)),
            origin=str(doc.get("origin", "docker")),
            labels=tuple(sorted(str(x) for x in (doc.get("labels") or []))),
            identity=int(doc.get("identity", INIT)),
            labels_known=bool(doc.get("labels_known", False)),
            container_id=str(doc.get("container_id", "")),
            ifname=str(doc.get("ifname", "")),
        )
