"""The kvstore key layout of a cellgate cluster, and the parsing of what is read back (docs/cluster.md).

Everything lives under one prefix, versioned per kind as Cilium's (`cilium/state/…/v1/`):

  cellgate/state/nodes/v1/<cluster>/<node>              node JSON, under the node's lease
  cellgate/state/ip/v1/<cluster>/<address>              ipcache entry JSON, under the owner's lease
  cellgate/state/identities/v1/id/<number>              identity JSON {"labels": [...]} (no lease)
  cellgate/state/identities/v1/labels/<sha256 of labels> {"id": number}: one number per label set
  cellgate/state/identities/v1/refs/<number>/<node>     a node uses the identity (under its lease)
  cellgate/state/services/v1/<cluster>/<name>           service spec JSON, under the owning node's lease

Store data is untrusted input: every reader here returns None (and says why) for anything
malformed, out of range or foreign, and callers skip it. Pure: standard library and datapath only.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from datapath import identity as ids
from datapath.errors import InvalidRequest
from datapath.labels import Label, LabelSet, canonical
from datapath.nodes import Node, RemoteEntry
from datapath.services import ServiceSpec

PREFIX = "cellgate/state/"
CLUSTER = "default"
NODES = f"{PREFIX}nodes/v1/{CLUSTER}/"
IPCACHE = f"{PREFIX}ip/v1/{CLUSTER}/"
IDENTITIES = f"{PREFIX}identities/v1/"
ID = f"{IDENTITIES}id/"
LABELS = f"{IDENTITIES}labels/"
REFS = f"{IDENTITIES}refs/"
SERVICES = f"{PREFIX}services/v1/{CLUSTER}/"

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_VALUE = 64 * 1024  # no honest value comes near this
MAX_SERVICE_VALUE = 256 * 1024  # a service of 4,096 IPv6 backends is about 130 KiB


N = TypeVar("N", ipaddress.IPv4Network, ipaddress.IPv6Network)


class BadData(ValueError):
    """A key or value in the store that cellgate did not write (or not this version)."""


# -- nodes ---------------------------------------------------------------------------------


def node_key(name: str) -> str:
    return NODES + name


@dataclass(frozen=True)
class NodeRecord:
    node: Node
    uid: str  # the agent's state directory's own ID: tells a restart of this node from an impostor
    tunnel: str

    def encode(self) -> bytes:
        n = self.node
        return _dump({
            "Name": n.name, "Cluster": CLUSTER, "uid": self.uid, "tunnel": self.tunnel,
            "IPAddresses": [{"Type": "InternalIP", "IP": str(n.address)}],
            "IPv4AllocCIDR": str(n.ipv4_range) if n.ipv4_range else "",
            "IPv6AllocCIDR": str(n.ipv6_range) if n.ipv6_range else "",
        })


def parse_node(key: str, value: bytes) -> NodeRecord:
    name = _tail(key, NODES)
    doc = _load(value)
    if doc.get("Name") != name:
        raise BadData(f"node key {key} holds node {doc.get('Name')!r}")
    addresses = doc.get("IPAddresses")
    if not isinstance(addresses, list) or not addresses or not isinstance(addresses[0], dict):
        raise BadData(f"node {name}: no IPAddresses")
    ip = addresses[0].get("IP")
    if not isinstance(ip, str):
        raise BadData(f"node {name}: IPAddresses[0].IP {ip!r:.60} is not an address string")
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError as exc:
        raise BadData(f"node {name}: IPAddresses[0].IP: {exc}") from None
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise BadData(f"node {name}: address {address} is not a node address")
    v4 = _range(doc, "IPv4AllocCIDR", ipaddress.IPv4Network, name)
    v6 = _range(doc, "IPv6AllocCIDR", ipaddress.IPv6Network, name)
    tunnel = doc.get("tunnel", "vxlan")
    if tunnel not in ("vxlan", "disabled"):
        raise BadData(f"node {name}: unknown tunnel {tunnel!r}")
    uid = doc.get("uid", "")
    if not isinstance(uid, str):
        raise BadData(f"node {name}: uid {uid!r:.60} is not a string")
    return NodeRecord(Node(name, address, v4, v6), uid, tunnel)


def _range(doc: dict[str, Any], field: str, kind: type[N], name: str) -> N | None:
    """A node's allocation range: absent, "" or null for none, else a network in CIDR form (a JSON
    number or a bare address is no range: ipaddress would take 5 as 0.0.0.5/32)."""
    value = doc.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "/" not in value:
        raise BadData(f"node {name}: {field} {value!r:.60} is not a network in CIDR form")
    try:
        return kind(value)
    except ValueError as exc:
        raise BadData(f"node {name}: {field}: {exc}") from None


def clash(me: NodeRecord, other: NodeRecord) -> str:
    """Why `other` (a live node in the store) and this node cannot both run; '' if they can."""
    a, b = me.node, other.node
    if a.name == b.name:
        return "" if me.uid == other.uid else (
            f"node name {a.name} is registered by another live agent (address {b.address}); "
            "give this agent another --node-name, or stop the other one")
    for mine, theirs in ((a.ipv4_range, b.ipv4_range), (a.ipv6_range, b.ipv6_range)):
        if mine is not None and theirs is not None and mine.overlaps(theirs):  # type: ignore[arg-type]
            return (f"range {mine} overlaps {theirs} of live node {b.name} ({b.address}); "
                    "give this agent another --node-index or --ipv4-range/--ipv6-range")
    if a.address == b.address:
        return f"node address {a.address} is used by live node {b.name}"
    return ""


# -- ipcache -------------------------------------------------------------------------------


def ip_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return IPCACHE + str(address)


@dataclass(frozen=True)
class IpRecord:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    identity: int
    node: str  # the publishing node's name
    host_ip: ipaddress.IPv4Address

    @functools.cached_property
    def entry(self) -> RemoteEntry:
        """The record as the datapath's remote entry, made once (records live in the watch cache)."""
        return RemoteEntry(ipaddress.ip_network((self.address, self.address.max_prefixlen)), self.identity,
                           self.host_ip)

    def encode(self) -> bytes:
        bits = self.address.max_prefixlen
        return _dump({"IP": str(self.address), "Mask": bits, "HostIP": str(self.host_ip),
                      "ID": self.identity, "node": self.node})


def parse_ip(key: str, value: bytes) -> IpRecord:
    text = _tail(key, IPCACHE)
    doc = _load(value)
    try:
        address = ipaddress.ip_address(text)
        host_ip = ipaddress.IPv4Address(str(doc.get("HostIP")))
        number = doc.get("ID")
    except ValueError as exc:
        raise BadData(f"ipcache {key}: {exc}") from None
    if str(doc.get("IP")) != str(address) or doc.get("Mask", address.max_prefixlen) != address.max_prefixlen:
        raise BadData(f"ipcache {key}: value names {doc.get('IP')}/{doc.get('Mask')}")
    if not isinstance(number, int) or isinstance(number, bool) or not cluster_number(number):
        raise BadData(f"ipcache {key}: identity {number!r} is not a cluster identity "
                      f"({ids.FIRST_ALLOCATED}..{ids.CLUSTER_LAST})")
    node = doc.get("node")
    if not isinstance(node, str) or not NAME.fullmatch(node):
        raise BadData(f"ipcache {key}: bad node {node!r}")
    return IpRecord(address, number, node, host_ip)


# -- services ------------------------------------------------------------------------------


def service_key(name: str) -> str:
    return SERVICES + name


def encode_service(spec: ServiceSpec) -> bytes:
    return _dump(spec.to_json())


def parse_service(key: str, value: bytes) -> ServiceSpec:
    """A peer's service, validated as a request is (frontend, backends, selector, limits)."""
    name = _tail(key, SERVICES)
    doc = _load(value, MAX_SERVICE_VALUE)
    try:
        spec = ServiceSpec.from_json(doc, f"service {key}")
    except InvalidRequest as exc:
        raise BadData(str(exc)) from None
    if spec.name != name:
        raise BadData(f"service key {key} holds service {spec.name!r}")
    if not NAME.fullmatch(spec.node):
        raise BadData(f"service {key}: bad owner node {spec.node!r}")
    return spec


# -- identities ----------------------------------------------------------------------------


def cluster_number(number: int) -> bool:
    return ids.FIRST_ALLOCATED <= number <= ids.CLUSTER_LAST


def id_key(number: int) -> str:
    return f"{ID}{number}"


def labels_key(labels: LabelSet) -> str:
    return LABELS + hashlib.sha256(canonical(labels).encode()).hexdigest()


def ref_key(number: int, node: str) -> str:
    return f"{REFS}{number}/{node}"


def encode_identity(labels: LabelSet) -> bytes:
    return _dump({"labels": sorted(str(label) for label in labels)})


def encode_number(number: int) -> bytes:
    return _dump({"id": number})


def parse_identity(key: str, value: bytes) -> tuple[int, LabelSet]:
    number = _number(_tail(key, ID), key)
    doc = _load(value)
    raw = doc.get("labels")
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw) or len(raw) > 256:
        raise BadData(f"identity {key}: labels must be a list of strings")
    try:
        labels = frozenset(Label.parse(x) for x in raw)
    except ValueError as exc:
        raise BadData(f"identity {key}: {exc}") from None
    if any(label.source == "reserved" for label in labels):
        raise BadData(f"identity {key}: reserved labels are never allocated")
    return number, labels


def parse_number(value: bytes, where: str) -> int:
    number = _load(value).get("id")
    if not isinstance(number, int) or isinstance(number, bool) or not cluster_number(number):
        raise BadData(f"{where}: {number!r} is not a cluster identity")
    return number


def parse_ref(key: str) -> tuple[int, str]:
    rest = _tail(key, REFS)
    number_text, _, node = rest.partition("/")
    if not NAME.fullmatch(node):
        raise BadData(f"identity reference {key}: bad node name")
    return _number(number_text, key), node


# -- helpers -------------------------------------------------------------------------------


def _tail(key: str, prefix: str) -> str:
    if not key.startswith(prefix):
        raise BadData(f"key {key} is not under {prefix}")
    rest = key[len(prefix):]
    if not rest or len(rest) > 200:
        raise BadData(f"key {key}: empty or overlong name")
    return rest


def _number(text: str, key: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise BadData(f"{key}: {text!r} is not an identity number")
    number = int(text)
    if not cluster_number(number):
        raise BadData(f"{key}: identity {number} out of range {ids.FIRST_ALLOCATED}..{ids.CLUSTER_LAST}")
    return number


def _load(value: bytes, limit: int = MAX_VALUE) -> dict[str, Any]:
    if len(value) > limit:
        raise BadData(f"value of {len(value)} bytes")
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadData(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadData("not a JSON object")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
