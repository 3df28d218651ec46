"""Requests of the `cellgate-cni` binary to the agent, parsed at the agent's CNI door.

Frozen values; a bad field raises InvalidRequest naming it, with the CNI code the binary
reports for it (plugin.cni.codes). Formats are ours (plugin/cni/main.py sends them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datapath import naming
from datapath.errors import InvalidRequest
from plugin.cni import codes

# Matched whole (fullmatch: `$` would also match before a final newline), in ASCII (`\w` is not).
CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}")
IFNAME = re.compile(r"[^/:\s]{1,15}")
NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

def _str(body: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    if not value:
        if required:
            raise InvalidRequest(f"{key} is required")
        return ""
    if pattern is not None and not pattern.fullmatch(value):
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


def _network(body: Mapping[str, Any], key: str, kind: Any) -> Any:
    """An optional CIDR string of one family ("" or null: none), or InvalidRequest naming `key`."""
    value = body.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a CIDR string")
    try:
        return kind(value)
    except ValueError as exc:
        raise InvalidRequest(f"{key} {value[:60]!r}: {exc}") from None


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
        labels = body.get("labels")
        labels = {} if labels is None else labels  # not `or`: [] and "" are no object of strings
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise InvalidRequest("labels must be an object of strings")
        source = _str(body, "label_source", required=False) or "cni"
        if source not in ("cni", "mesos"):
            raise InvalidRequest(f"label_source {source!r} must be cni or mesos")
        subnet = _network(body, "subnet", ipaddress.IPv4Network)
        subnet6 = _network(body, "ipv6_subnet", ipaddress.IPv6Network)
        raw_ips = body.get("ips")
        raw_ips = [] if raw_ips is None else raw_ips
        if not isinstance(raw_ips, list) or not all(isinstance(x, str) for x in raw_ips):
            raise InvalidRequest("ips must be a list of IP address strings")
        ips = []
        for i, text in enumerate(raw_ips):
            try:
                ips.append(ipaddress.ip_address(text.split("/")[0]))
            except ValueError:
                raise InvalidRequest(f"ips[{i}] {text[:60]!r} is not an IP address") from None
        ipv6 = body.get("ipv6", False)
        if not isinstance(ipv6, bool):
            raise InvalidRequest("ipv6 must be true or false")
        mac = _str(body, "mac", required=False)
        if mac and (not MAC.fullmatch(mac) or int(mac[:2], 16) & 1):
            raise InvalidRequest(f"mac {mac!r} is not a unicast MAC address", cni_code=codes.INVALID_ENV)
        return cls(att, dict(labels), source, subnet, ipv6 or subnet6 is not None, subnet6, tuple(ips),
                   mac.lower(), _str(body, "name", required=False)[:253])


@dataclass(frozen=True)
class GcRequest:
    network: str
    valid: tuple[tuple[str, str], ...]  # (container ID, interface) of every attachment to keep

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GcRequest:
        """Every entry of `valid` is checked: one skipped would leave its attachment off the list of
        those to keep, and GC would remove it."""
        network = _str(body, "network", NETWORK)
        valid = body.get("valid")
        valid = [] if valid is None else valid
        if not isinstance(valid, list):
            raise InvalidRequest("valid must be a list of {container_id, ifname}")
        pairs: list[tuple[str, str]] = []
        for i, entry in enumerate(valid):
            if not isinstance(entry, dict) or set(entry) != {"container_id", "ifname"}:
                raise InvalidRequest(f"valid[{i}] must be an object with container_id and ifname (and no more)")
            try:
                pairs.append((_str(entry, "container_id", CONTAINER_ID), _str(entry, "ifname", IFNAME)))
            except InvalidRequest as exc:
                raise InvalidRequest(f"valid[{i}]: {exc}") from None
        return cls(network, tuple(pairs))
