"""Requests of the `cellgate-cni` binary to the agent, parsed at the agent's CNI door.

Frozen values; a bad field raises InvalidRequest naming it, with the CNI code the binary
reports for it (plugin.cni.codes). Formats are ours (plugin/cni/main.py sends them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datapath import naming
from datapath.errors import InvalidRequest
from plugin.cni import codes

CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}$")
IFNAME = re.compile(r"^[^/:\s]{1,15}$")
NETWORK = re.compile(r"^[A-Za-z0-9][\w.\-]{0,127}$")
MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

def _str(body: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    if not value:
        if required:
            raise InvalidRequest(f"{key} is required")
        return ""
    if pattern is not None and not pattern.match(value):
        raise InvalidRequest(f"{key} {value[:80]!r} is not valid")
    return value


@dataclass(frozen=True)
class Attachment:
    network: str
    container_id: str
    ifname: str
    netns: str

    @property
    def endpoint_id(self) -> str:
        return naming.endpoint_id_for(self.container_id, self.ifname)

    @classmethod
    def parse(cls, body: Mapping[str, Any], netns_required: bool) -> Attachment:
        netns = _str(body, "netns", required=netns_required)
        if netns and (not netns.startswith("/") or "\0" in netns or len(netns) > 4096):
            raise InvalidRequest(f"netns {netns[:80]!r} must be an absolute path", cni_code=codes.INVALID_ENV)
        try:
            return cls(_str(body, "network", NETWORK), _str(body, "container_id", CONTAINER_ID),
                       _str(body, "ifname", IFNAME), netns)
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc), cni_code=codes.INVALID_ENV) from None


@dataclass(frozen=True)
class AddRequest:
    attachment: Attachment
    labels: dict[str, str]
    label_source: str
    subnet: ipaddress.IPv4Network | None
    ipv6: bool
    subnet6: ipaddress.IPv6Network | None
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    mac: str
    name: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> AddRequest:
        att = Attachment.parse(body, netns_required=True)
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise InvalidRequest("labels must be an object of strings")
        source = _str(body, "label_source", required=False) or "cni"
        if source not in ("cni", "mesos"):
            raise InvalidRequest(f"label_source {source!r} must be cni or mesos")
        try:
            subnet = ipaddress.IPv4Network(body["subnet"]) if body.get("subnet") else None
            subnet6 = ipaddress.IPv6Network(body["ipv6_subnet"]) if body.get("ipv6_subnet") else None
            ips = tuple(ipaddress.ip_address(str(x).split("/")[0]) for x in body.get("ips") or [])
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc)) from None
        mac = _str(body, "mac", required=False)
        if mac and (not MAC.match(mac) or int(mac[:2], 16) & 1):
            raise InvalidRequest(f"MAC {mac!r} is not a unicast MAC address", cni_code=codes.INVALID_ENV)
        return cls(att, dict(labels), source, subnet, bool(body.get("ipv6")) or subnet6 is not None, subnet6, ips,
                   mac.lower(), _str(body, "name", required=False)[:253])


@dataclass(frozen=True)
class GcRequest:
    network: str
    valid: tuple[tuple[str, str], ...]  # (container ID, interface) of every attachment to keep

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GcRequest:
        network = body.get("network")
        valid = body.get("valid") or []
        if not isinstance(network, str) or not network or not isinstance(valid, list):
            raise InvalidRequest("send {network, valid: [{container_id, ifname}]}")
        pairs: Sequence[tuple[str, str]] = [(str(v.get("container_id", "")), str(v.get("ifname", "")))
                                            for v in valid if isinstance(v, dict)]
        return cls(network, tuple(pairs))
