"""Parsing the CNI invocation at the door: environment, CNI_ARGS, and the network configuration.

Standard library only (the `cellgate-cni` binary runs with `python -IS`). Every check
raises CniError with the code of the CNI specification and a message naming the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from plugin.cni.codes import (
        INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    UNSUPPORTED_FIELD,
    CniError,
)

SUPPORTED = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "0.1.0"  # a configuration without cniVersion is 0.1.0 (libcni, Mesos)

# Matched whole (fullmatch: `$` would also match before a final newline), in ASCII.
CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}")  # as the agent's (plugin.cni.messages)
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
KNOWN_ARGS = {"IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID",
              "IP", "MAC", "CELLGATE_LABELS"}
# Keys the runtime or libcni may put next to ours; anything else in our plugin's object is refused.
CONFIG_KEYS = {"cniVersion", "cniVersions", "name", "type", "args", "runtimeConfig", "capabilities", "prevResult",
               "dns", "socket", "subnet", "ipv6", "ipv6Subnet", "disableCheck", "disableGC",
               "cni.dev/attachments", "cni.dev/valid-attachments"}



def parse_cni_args(raw: str) -> dict[str, str]:
    """`K=V;K=V` as libcni reads it: unknown keys are an error unless IgnoreUnknown is true."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise CniError(INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r} (expected KEY=VALUE)")
        out[key] = value
    ignore = out.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(set(out) - KNOWN_ARGS)
    if unknown and not ignore:
        raise CniError(INVALID_ENV, f"CNI_ARGS: unknown key(s) {', '.join(unknown)} (set IgnoreUnknown=1 to allow)")
    return out


def _bad(where: str, value: Any, want: str, code: int = INVALID_CONFIG) -> CniError:
    return CniError(code, f"{where} = {json.dumps(value)[:100]}: {want}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, value, "must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(where, value, "must be a list")
    return value


def _string(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _bad(f"{where}.{key}" if where else key, value, "must be a string" + (" (required)" if required else ""))
    return value


def _strings(obj: dict[str, Any], key: str, where: str) -> list[str]:
    if obj.get(key) is None:
        return []
    items = _list(obj[key], f"{where}.{key}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _bad(f"{where}.{key}[{i}]", item, "must be a string")
    return items


def _address(obj: dict[str, Any], key: str, where: str, required: bool = False, prefix: bool = False) -> None:
    """A string holding an IP address (`prefix`: with a prefix length, as results write addresses)."""
    value = _string(obj, key, where, required)
    if not value:
        return
    try:
        ipaddress.ip_interface(value) if prefix else ipaddress.ip_address(value)
    except ValueError:
        raise _bad(f"{where}.{key}", value, "is not an IP address" + (" with a prefix length" if prefix else "")) \
            from None
    if prefix and "/" not in value:
        raise _bad(f"{where}.{key}", value, "needs a prefix length")


def check_dns(raw: Any, where: str, lists: tuple[str, ...] = ("nameservers", "search", "options"),
              domain: bool = True) -> None:
    if raw is None:
        return
    dns = _object(raw, where)
    for key in lists:
        _strings(dns, key, where)
    if domain:
        _string(dns, "domain", where)


def check_runtime_config(raw: Any) -> tuple[list[str], str]:
    """The addresses and MAC the runtime asks for; every key of the CNI conventions is checked, others ignored."""
    if raw is None:
        return [], ""
    rc = _object(raw, "runtimeConfig")
    ips = []
    if rc.get("ips") is not None:
        for i, item in enumerate(_list(rc["ips"], "runtimeConfig.ips")):
            if not isinstance(item, str):
                raise _bad(f"runtimeConfig.ips[{i}]", item, "must be an IP address string")
            try:
                ipaddress.ip_interface(item)
            except ValueError:
                raise _bad(f"runtimeConfig.ips[{i}]", item, "is not an IP address") from None
            ips.append(item)
    mac = rc.get("mac")
    if mac is not None and (not isinstance(mac, str) or not MAC.fullmatch(mac) or int(mac[:2], 16) & 1):
        raise _bad("runtimeConfig.mac", mac, "must be a unicast MAC address like 02:42:ac:11:00:02")
    if rc.get("portMappings") is not None:
        for i, raw_map in enumerate(_list(rc["portMappings"], "runtimeConfig.portMappings")):
            where = f"runtimeConfig.portMappings[{i}]"
            mapping = _object(raw_map, where)
            for key in ("hostPort", "containerPort"):
                port = mapping.get(key)
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise _bad(f"{where}.{key}", port, "must be a port number from 1 to 65535")
            protocol = mapping.get("protocol")
            if protocol is not None and (not isinstance(protocol, str) or protocol.lower() not in ("tcp", "udp",
                                                                                                 "sctp")):
                raise _bad(f"{where}.protocol", protocol, "must be tcp, udp or sctp")
            _address(mapping, "hostIP", where)
    if rc.get("aliases") is not None:
        aliases = _object(rc["aliases"], "runtimeConfig.aliases")
        for network in aliases:
            _strings(aliases, network, "runtimeConfig.aliases")
    check_dns(rc.get("dns"), "runtimeConfig.dns", ("servers", "searches", "options"), domain=False)
    return ips, mac or ""


def check_prev_result(raw: Any) -> dict[str, Any] | None:
    """The previous plugin's result, checked completely: we print it again after our own."""
    if raw is None:
        return None
    prev = _object(raw, "prevResult")
    ifaces = _list(prev["interfaces"], "prevResult.interfaces") if prev.get("interfaces") is not None else []
    for i, raw_iface in enumerate(ifaces):
        where = f"prevResult.interfaces[{i}]"
        iface = _object(raw_iface, where)
        _string(iface, "name", where, required=True)
        _string(iface, "mac", where)
        _string(iface, "sandbox", where)
    for i, raw_ip in enumerate(_list(prev["ips"], "prevResult.ips") if prev.get("ips") is not None else []):
        where = f"prevResult.ips[{i}]"
        ip = _object(raw_ip, where)
        _address(ip, "address", where, required=True, prefix=True)
        _address(ip, "gateway", where)
        index = ip.get("interface")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or not 0 <= index < len(ifaces)):
            raise _bad(f"{where}.interface", index, f"must index prevResult.interfaces (0 to {len(ifaces) - 1})")
        if ip.get("version") is not None and ip["version"] not in ("4", "6"):
            raise _bad(f"{where}.version", ip["version"], 'must be "4" or "6"')
    check_routes(prev.get("routes"), "prevResult.routes")
    for key in ("ip4", "ip6"):  # the 0.1/0.2 form
        if prev.get(key) is not None:
            old = _object(prev[key], f"prevResult.{key}")
            _address(old, "ip", f"prevResult.{key}", required=True, prefix=True)
            _address(old, "gateway", f"prevResult.{key}")
            check_routes(old.get("routes"), f"prevResult.{key}.routes")
    check_dns(prev.get("dns"), "prevResult.dns")
    return prev


def check_routes(raw: Any, where: str) -> None:
    for i, raw_route in enumerate(_list(raw, where) if raw is not None else []):
        route = _object(raw_route, f"{where}[{i}]")
        dst = _string(route, "dst", f"{where}[{i}]", required=True)
        try:
            ipaddress.ip_network(dst, strict=False)
        except ValueError:
            raise _bad(f"{where}[{i}].dst", dst, "is not a CIDR") from None
        _address(route, "gw", f"{where}[{i}]")


def attachments(conf: dict[str, Any]) -> list[dict[str, str]]:
    """GC's list of attachments to keep, from both keys (libcni sends both: a typo in the spec)."""
    out = []
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        for i, raw in enumerate(_list(conf[key], key) if conf.get(key) is not None else []):
            entry = _object(raw, f"{key}[{i}]")
            out.append({"container_id": _string(entry, "containerID", f"{key}[{i}]", required=True),
                        "ifname": _string(entry, "ifname", f"{key}[{i}]", required=True)})
    return out


def check_static(conf: dict[str, Any]) -> None:
    """The rest of the configuration's shape (all but DEL, which reads none of it)."""
    _string(conf, "type", "")
    _strings(conf, "cniVersions", "cniVersions")
    for key in ("disableCheck", "disableGC"):
        if conf.get(key) is not None and not isinstance(conf[key], bool):
            raise _bad(key, conf[key], "must be true or false")
    if conf.get("capabilities") is not None:
        caps = _object(conf["capabilities"], "capabilities")
        for name, on in caps.items():
            if not isinstance(on, bool):
                raise _bad(f"capabilities.{name}", on, "must be true or false")
    check_dns(conf.get("dns"), "dns")
    attachments(conf)


def parse_label_list(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise CniError(INVALID_CONFIG, f"{where} must be a list of {{key, value}} objects")
    out = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not item["key"]:
            raise CniError(INVALID_CONFIG, f"{where}: every label needs a string key")
        value = item.get("value", "")
        if not isinstance(value, (str, int, float, bool)):
            raise CniError(INVALID_CONFIG, f"{where}: the value of {item['key']!r} must be a string")
        out[item["key"]] = str(value)
    return out


def labels_from(conf: dict[str, Any], cni_args: dict[str, str]) -> tuple[dict[str, str], str]:
    """Workload labels and their source, from whatever the runtime passes."""
    args = _object(conf["args"], "args") if conf.get("args") is not None else {}
    mesos = args.get("org.apache.mesos")
    if mesos is not None:
        where = "args.org.apache.mesos"
        info = _object(mesos, where).get("network_info")
        info = _object(info, f"{where}.network_info") if info is not None else {}
        labels = info.get("labels")
        labels = _object(labels, f"{where}.network_info.labels") if labels is not None else {}
        return parse_label_list(labels.get("labels"), f"{where}.network_info.labels.labels"), "mesos"
    cni = _object(args["cni"], "args.cni") if args.get("cni") is not None else {}
    out = parse_label_list(cni.get("labels"), "args.cni.labels")
    if cni_args.get("K8S_POD_NAMESPACE"):
        out["io.kubernetes.pod.namespace"] = cni_args["K8S_POD_NAMESPACE"]
    for pair in filter(None, cni_args.get("CELLGATE_LABELS", "").split(",")):
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS: CELLGATE_LABELS wants key:value[,key:value], got {pair!r}")
        out[key] = value
    return out, "cni"


def check_config(conf: dict[str, Any]) -> str:
    version = conf.get("cniVersion") or DEFAULT_VERSION
    if not isinstance(version, str) or version not in SUPPORTED:
        raise CniError(INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       f"supported versions: {', '.join(SUPPORTED)}")
    name = conf.get("name")
    if not isinstance(name, str) or not name or len(name) > 128 or not NETWORK_NAME.fullmatch(name):
        raise CniError(INVALID_CONFIG, "the network configuration needs a name (letters, digits, _ . -)")
    for key in conf:
        if key not in CONFIG_KEYS:
            raise CniError(UNSUPPORTED_FIELD, f"unsupported field {key!r} = {json.dumps(conf[key])[:100]}",
                           "cellgate does its own IPAM: remove 'ipam' and use subnet/ipv6Subnet" if key == "ipam"
                           else "")
    for key in ("subnet", "ipv6Subnet"):  # a known field with a bad value: code 2, naming key and value
        if conf.get(key) is not None:
            family = 4 if key == "subnet" else 6
            shown = f"{key} = {json.dumps(conf[key])[:100]}"
            if not isinstance(conf[key], str):
                raise CniError(UNSUPPORTED_FIELD, f"unsupported value {shown}: must be a CIDR string")
            try:
                net = ipaddress.ip_network(conf[key])
            except ValueError as exc:
                raise CniError(UNSUPPORTED_FIELD, f"unsupported value {shown}: {exc}") from None
            if net.version != family:
                raise CniError(UNSUPPORTED_FIELD, f"unsupported value {shown}: not an IPv{family} subnet")
    if conf.get("ipv6") is not None and not isinstance(conf["ipv6"], bool):
        raise CniError(UNSUPPORTED_FIELD, f"unsupported value ipv6 = {json.dumps(conf['ipv6'])[:100]}: "
                                          "must be true or false")
    _string(conf, "socket", "")
    return version


def check_env(env: dict[str, str], command: str) -> dict[str, str]:
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [k for k in needed if not env.get(k)]
    if missing:
        raise CniError(INVALID_ENV, f"missing environment variable(s): {', '.join(missing)}")
    if "CNI_CONTAINERID" in needed and not CONTAINER_ID.fullmatch(env["CNI_CONTAINERID"]):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {env['CNI_CONTAINERID'][:80]!r} is not a valid container ID")
    ifname = env.get("CNI_IFNAME", "")
    if "CNI_IFNAME" in needed and (len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname)):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname[:80]!r} is not a valid interface name")
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENV, f"CNI_NETNS {netns[:120]!r} must be an absolute path")
    return {k: env[k] for k in needed}
