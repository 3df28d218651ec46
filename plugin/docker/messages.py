"""libnetwork remote-driver requests parsed at the door into frozen values.

Docker's wire format is lenient (no Content-Type, `null` for empty maps, keys we do not
use), so parsing tolerates all that; the values themselves are validated strictly and a
bad one raises InvalidRequest naming the field. Formats per reference/libnetwork.md §1.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import InvalidRequest
from datapath.model import IPInterface
from datapath.naming import ENDPOINT_ID
from ipam.allocator import GLOBAL_SPACE, LOCAL_SPACE
from ipam.pool import KIND_AUX, KIND_ENDPOINT, KIND_GATEWAY, check_routable, host_address_problem

Body = Mapping[str, Any]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# Docker's option keys; decoded here, so that nothing behind the door sees Docker's vocabulary.
GENERIC_OPTIONS = "com.docker.network.generic"
INTERNAL_OPTION = "com.docker.network.internal"
GATEWAY_KEY = "com.docker.network.gateway"  # RequestPool's answer Data key, and a RequestAddressType
REQUEST_TYPE_KEY = "RequestAddressType"
MAC_KEY = "com.docker.network.endpoint.macaddress"
MAX_STRING = 4096


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a dict: empty or `null` bodies are {}; anything else must be an object."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _str(body: Body, key: str, required: bool = True) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"missing field {key}")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"field {key} must be a string")
    if len(value) > MAX_STRING:
        raise InvalidRequest(f"field {key} is too long")
    return value


def _id(body: Body, key: str) -> str:
    value = _str(body, key)
    if not ENDPOINT_ID.fullmatch(value):  # not match: `$` also matches before a final newline
        raise InvalidRequest(f"field {key} must be a hexadecimal ID, got {value[:80]!r}")
    return value


def _given(body: Body, key: str) -> bool:
    """Whether an optional field is there: Docker leaves one out, or sends null or ""; any other
    value (0, [], false included) is a value to judge."""
    return body.get(key) not in (None, "")


def _pool_id(body: Body, key: str = "PoolID") -> tuple[str, Network]:
    """A pool ID as RequestPool hands them out (ipam.pool.pool_id: SPACE/SUBNET[/RANGE]), and its
    subnet. Docker sends back only IDs it was given, so anything else is refused, never looked up."""
    value = _str(body, key)
    space, _, rest = value.partition("/")
    parts = rest.split("/")
    try:
        if space not in (LOCAL_SPACE, GLOBAL_SPACE) or len(parts) not in (2, 4):
            raise ValueError
        subnet = ipaddress.ip_network("/".join(parts[:2]), strict=True)
        subpool = ipaddress.ip_network("/".join(parts[2:]), strict=True) if len(parts) == 4 else subnet
        if subpool.version != subnet.version or not subpool.subnet_of(subnet):  # type: ignore[arg-type]
            raise ValueError
    except (ValueError, TypeError):
        raise InvalidRequest(f"field {key} {value[:80]!r} is not a pool ID of this driver "
                             f"({LOCAL_SPACE}/SUBNET[/RANGE])") from None
    return value, subnet


def _map(body: Body, key: str) -> Mapping[str, Any]:
    value = body.get(key)
    if value is None:
        return {}  # Docker sends null for empty maps
    if not isinstance(value, dict):
        raise InvalidRequest(f"field {key} must be an object")
    return value


def _list(body: Body, key: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"field {key} must be a list")
    return value


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"field {key} must be a boolean")


def _cidr(value: Any, key: str) -> Network:
    if not isinstance(value, str):
        raise InvalidRequest(f"field {key} must be a CIDR string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"field {key}: {exc}") from None


def _interface(value: Any, key: str) -> IPInterface:
    if not isinstance(value, str) or "/" not in value:
        raise InvalidRequest(f"field {key} must be an address with a prefix length, got {value!r}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        raise InvalidRequest(f"field {key}: {exc}") from None


def _address(value: Any, key: str) -> Address | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"field {key} must be an IP address")
    try:
        return ipaddress.ip_address(value.split("/")[0] if "/" in value else value)
    except ValueError as exc:
        raise InvalidRequest(f"field {key}: {exc}") from None


def _mac(value: Any, key: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not MAC.fullmatch(value):
        raise InvalidRequest(f"field {key} must be a MAC address like 02:42:ac:11:00:02")
    if int(value[:2], 16) & 1:
        raise InvalidRequest(f"field {key} must be a unicast MAC address")
    return value.lower()


def _string_map(raw: Mapping[str, Any], key: str) -> dict[str, str]:
    out = {}
    for k, v in raw.items():
        if not isinstance(v, (str, int, float, bool)):
            raise InvalidRequest(f"field {key}.{k} must be a string")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


# -- NetworkDriver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateNetwork:
    network_id: str
    gateways: tuple[IPInterface, ...]
    ipv6: bool

    @classmethod
    def parse(cls, body: Body) -> CreateNetwork:
        network_id = _id(body, "NetworkID")
        options = _map(body, "Options")
        generic = options.get(GENERIC_OPTIONS)
        generic = {} if generic is None else generic  # Docker sends null for none; [] or "" are no object
        if not isinstance(generic, dict):
            raise InvalidRequest(f"field Options.{GENERIC_OPTIONS} must be an object")
        if generic:
            raise InvalidRequest(
                "unsupported driver option(s): " + ", ".join(sorted(generic)) + " (cellgate takes no -o options)"
            )
        if INTERNAL_OPTION in options and _bool(options[INTERNAL_OPTION], INTERNAL_OPTION):
            raise InvalidRequest("--internal networks are not supported by cellgate yet")
        gateways = []
        for family, key in ((4, "IPv4Data"), (6, "IPv6Data")):
            for i, data in enumerate(_list(body, key)):
                if not isinstance(data, dict):
                    raise InvalidRequest(f"field {key}[{i}] must be an object")
                pool = _cidr(data.get("Pool"), f"{key}[{i}].Pool")
                if pool.version != family:
                    raise InvalidRequest(f"field {key}[{i}].Pool must be IPv{family}")
                if not data.get("Gateway"):
                    raise InvalidRequest(f"field {key}[{i}].Gateway is missing: the network needs a gateway")
                gw = _interface(data.get("Gateway"), f"{key}[{i}].Gateway")
                if gw.network != pool:
                    raise InvalidRequest(f"gateway {gw} is not inside pool {pool}")
                check_routable(pool, f"field {key}[{i}].Pool")
                problem = host_address_problem(gw.ip, pool)
                if problem:
                    raise InvalidRequest(f"field {key}[{i}].Gateway {gw} {problem}")
                gateways.append(gw)
        if not gateways:
            raise InvalidRequest("the network has no IPv4Data or IPv6Data")
        return cls(network_id, tuple(gateways), any(g.version == 6 for g in gateways))


@dataclass(frozen=True)
class NetworkRef:
    network_id: str

    @classmethod
    def parse(cls, body: Body) -> NetworkRef:
        return cls(_id(body, "NetworkID"))


@dataclass(frozen=True)
class EndpointRef:
    network_id: str
    endpoint_id: str

    @classmethod
    def parse(cls, body: Body) -> EndpointRef:
        return cls(_id(body, "NetworkID"), _id(body, "EndpointID"))


@dataclass(frozen=True)
class CreateEndpoint:
    network_id: str
    endpoint_id: str
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None
    mac: str

    @classmethod
    def parse(cls, body: Body) -> CreateEndpoint:
        iface = _map(body, "Interface")
        v4 = _interface(iface["Address"], "Interface.Address") if _given(iface, "Address") else None
        v6 = _interface(iface["AddressIPv6"], "Interface.AddressIPv6") if _given(iface, "AddressIPv6") else None
        if v4 is not None and v4.version != 4:
            raise InvalidRequest("field Interface.Address must be IPv4")
        if v6 is not None and v6.version != 6:
            raise InvalidRequest("field Interface.AddressIPv6 must be IPv6")
        return cls(
            _id(body, "NetworkID"),
            _id(body, "EndpointID"),
            v4,  # type: ignore[arg-type]
            v6,  # type: ignore[arg-type]
            _mac(iface.get("MacAddress"), "Interface.MacAddress"),
        )


@dataclass(frozen=True)
class Join:
    network_id: str
    endpoint_id: str
    sandbox_key: str

    @classmethod
    def parse(cls, body: Body) -> Join:
        key = _str(body, "SandboxKey")
        if not key.startswith("/") or "\0" in key:
            raise InvalidRequest("field SandboxKey must be an absolute path")
        return cls(_id(body, "NetworkID"), _id(body, "EndpointID"), key)


# -- IpamDriver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPool:
    space: str
    pool: Network | None
    subpool: Network | None
    v6: bool
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Body) -> RequestPool:
        space = _str(body, "AddressSpace")
        pool = _cidr(body["Pool"], "Pool") if _given(body, "Pool") else None  # not `or`: [] is no CIDR
        subpool = _cidr(body["SubPool"], "SubPool") if _given(body, "SubPool") else None
        v6 = _bool(body.get("V6", False), "V6")
        return cls(space, pool, subpool, v6, _string_map(_map(body, "Options"), "Options"))


@dataclass(frozen=True)
class PoolRef:
    pool_id: str

    @classmethod
    def parse(cls, body: Body) -> PoolRef:
        return cls(_pool_id(body)[0])


@dataclass(frozen=True)
class RequestAddress:
    """`kind` is decoded from Docker's options: the gateway (RequestAddressType), an aux
    address (`--aux-address`: an address and no options at all), or an endpoint's, whose MAC
    (the MAC option) makes Docker's retries idempotent."""

    pool_id: str
    address: Address | None
    kind: str
    mac: str

    @classmethod
    def parse(cls, body: Body) -> RequestAddress:
        options = _string_map(_map(body, "Options"), "Options")
        if options.get(REQUEST_TYPE_KEY) == GATEWAY_KEY:
            kind = KIND_GATEWAY
        elif not options:
            kind = KIND_AUX  # IPAM takes it as an endpoint's once the network exists
        else:
            kind = KIND_ENDPOINT
        return cls(_pool_id(body)[0], _address(body.get("Address"), "Address"), kind,
                   _mac(options.get(MAC_KEY), f"Options.{MAC_KEY}"))


@dataclass(frozen=True)
class ReleaseAddress:
    pool_id: str
    address: Address

    @classmethod
    def parse(cls, body: Body) -> ReleaseAddress:
        pool_id, subnet = _pool_id(body)
        address = _address(body.get("Address"), "Address")
        if address is None:
            raise InvalidRequest("missing field Address")
        if address not in subnet:  # the release would otherwise free it wherever it is
            raise InvalidRequest(f"field Address: {address} is not in pool {pool_id}")
        return cls(pool_id, address)
