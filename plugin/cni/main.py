"""`cellgate-cni`: the CNI plugin. A thin client of the agent; standard library only.

The runtime runs it with CNI_* environment variables and the network configuration on
stdin. VERSION is answered here without the agent (runtimes ask it constantly); every
other command is parsed and validated here, then carried out by the agent over its
REST socket. Results and errors are printed in the form of the configuration's
cniVersion: `ip4`/`ip6` for 0.1/0.2 (what Mesos reads), `ips` with `version` for
0.3.x/0.4.0, `ips` without it for 1.x. Errors are `{cniVersion, code, msg, details}` on
stdout with a non-zero exit; diagnostics go to stderr only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from typing import IO, Any

SUPPORTED = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "0.1.0"  # a configuration without cniVersion is 0.1.0 (libcni, Mesos)
DEFAULT_SOCKET = "/var/run/cellgate/cellgate.sock"

CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
KNOWN_ARGS = {"IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID",
              "IP", "MAC", "CELLGATE_LABELS"}
# Keys the runtime or libcni may put next to ours; anything else in our plugin's object is refused.
CONFIG_KEYS = {"cniVersion", "cniVersions", "name", "type", "args", "runtimeConfig", "capabilities", "prevResult",
               "dns", "socket", "subnet", "ipv6", "ipv6Subnet", "disableCheck", "disableGC",
               "cni.dev/attachments", "cni.dev/valid-attachments"}

# Well-known CNI error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
PLUGIN_NOT_AVAILABLE = 50
INTERFACE_EXISTS = 100  # plugin-specific: CNI_IFNAME already exists in the namespace
INTERNAL = 999  # plugin-specific: a bug in the plugin; the message says what failed


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


# -- parsing at the door ---------------------------------------------------------------------


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
    if mac is not None and (not isinstance(mac, str) or not MAC.match(mac) or int(mac[:2], 16) & 1):
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
    if not isinstance(name, str) or not name or len(name) > 128 or not re.match(r"^[A-Za-z0-9][\w.\-]*$", name):
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
    if "CNI_CONTAINERID" in needed and not CONTAINER_ID.match(env["CNI_CONTAINERID"]):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {env['CNI_CONTAINERID'][:80]!r} is not a valid container ID")
    ifname = env.get("CNI_IFNAME", "")
    if "CNI_IFNAME" in needed and (len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname)):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname[:80]!r} is not a valid interface name")
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENV, f"CNI_NETNS {netns[:120]!r} must be an absolute path")
    return {k: env[k] for k in needed}


# -- results ---------------------------------------------------------------------------------


def format_result(version: str, result: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """The agent's result (1.x shape) in the configuration's version, after any prevResult."""
    ifaces = list((prev or {}).get("interfaces") or [])
    ips = [dict(x) for x in (prev or {}).get("ips") or []]
    routes = list((prev or {}).get("routes") or [])
    offset = len(ifaces)
    ifaces.extend(result["interfaces"])
    for ip in result["ips"]:
        ips.append({**ip, "interface": ip["interface"] + offset})
    routes.extend(r for r in result["routes"] if r not in routes)
    dns = (prev or {}).get("dns") or result.get("dns") or {}
    if _version_tuple(version) < (0, 3, 0):
        out: dict[str, Any] = {"cniVersion": version, "dns": dns}
        for family, key in ((4, "ip4"), (6, "ip6")):
            mine = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == family]
            if mine:
                entry: dict[str, Any] = {"ip": mine[-1]["address"]}
                if mine[-1].get("gateway"):
                    entry["gateway"] = mine[-1]["gateway"]
                fam_routes = [r for r in routes if ipaddress.ip_network(r["dst"], strict=False).version == family]
                if fam_routes:
                    entry["routes"] = fam_routes
                out[key] = entry
        return out
    if _version_tuple(version) < (1, 0, 0):
        for ip in ips:
            ip["version"] = str(ipaddress.ip_interface(ip["address"]).version)
    else:
        for ip in ips:
            ip.pop("version", None)
    return {"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes, "dns": dns}


# -- the commands ----------------------------------------------------------------------------


def _call(conf: dict[str, Any], env: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    from plugin.api.client import AgentUnreachable, ApiError, Client

    sock = str(conf.get("socket") or env.get("CELLGATE_SOCK") or DEFAULT_SOCKET)
    try:
        return Client(sock, timeout=60).post(path, body)
    except AgentUnreachable as exc:
        raise CniError(TRY_AGAIN, "the cellgate agent is not reachable", str(exc)) from None
    except ApiError as exc:
        code = getattr(exc, "cni_code", 0) or {400: INVALID_CONFIG, 404: UNKNOWN_CONTAINER}.get(exc.status, IO_FAILURE)
        raise CniError(code, str(exc)) from None


def run(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, JSON to print or None, version) for one invocation."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set")
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise CniError(DECODE_FAILURE, f"cannot decode the network configuration: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration must be a JSON object")
    if command == "VERSION":
        asked = conf["cniVersion"] if isinstance(conf.get("cniVersion"), str) else "1.0.0"
        return 0, {"cniVersion": asked, "supportedVersions": list(SUPPORTED)}, asked
    if command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command[:40]!r}")
    version = check_config(conf)
    if command in ("CHECK",) and _version_tuple(version) < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"configuration version {version} does not allow CHECK")
    if command in ("GC", "STATUS") and _version_tuple(version) < (1, 1, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"configuration version {version} does not allow {command}")
    base = check_env(env, command)
    cni_args = parse_cni_args(env.get("CNI_ARGS", ""))
    # Everything is checked before the agent is asked. DEL reads none of the rest, and must
    # succeed after any failed ADD, so it does not judge it.
    labels: dict[str, str] = {}
    ips: list[str] = []
    source, mac, prev = "cni", "", None
    if command != "DEL":
        check_static(conf)
        labels, source = labels_from(conf, cni_args)
    if command in ("ADD", "CHECK"):
        ips, mac = check_runtime_config(conf.get("runtimeConfig"))
        prev = check_prev_result(conf.get("prevResult"))
    body: dict[str, Any] = {
        "network": conf["name"],
        "container_id": base.get("CNI_CONTAINERID", ""),
        "ifname": base.get("CNI_IFNAME", ""),
        "netns": env.get("CNI_NETNS", ""),
    }
    if command == "ADD":
        if cni_args.get("IP"):
            try:
                ipaddress.ip_address(cni_args["IP"].split("/")[0])
            except ValueError:
                raise CniError(INVALID_ENV, f"CNI_ARGS: IP {cni_args['IP'][:60]!r} is not an IP address") from None
        body.update({
            "labels": labels,
            "label_source": source,
            "subnet": conf.get("subnet") or "",
            "ipv6": bool(conf.get("ipv6") or conf.get("ipv6Subnet")),
            "ipv6_subnet": conf.get("ipv6Subnet") or "",
            "ips": [cni_args["IP"]] if cni_args.get("IP") else ips,
            "mac": cni_args.get("MAC", "") or mac,
            "name": cni_args.get("K8S_POD_NAME", ""),
        })
        result = _call(conf, env, "/v1/cni/add", body)
        try:
            return 0, format_result(version, result, prev), version
        except Exception as exc:  # a result we cannot print: undo rather than leave it unreported
            try:
                _call(conf, env, "/v1/cni/del", {k: body[k] for k in ("network", "container_id", "ifname", "netns")})
            except CniError as undo:
                print(f"cellgate-cni: cannot undo the ADD: {undo.msg}", file=sys.stderr)
            raise CniError(INTERNAL, f"cannot write the result: {type(exc).__name__}: {exc}") from None
    if command == "DEL":
        _call(conf, env, "/v1/cni/del", body)
        return 0, None, version
    if command == "CHECK":
        _call(conf, env, "/v1/cni/check", body)
        return 0, None, version
    if command == "GC":
        body["valid"] = attachments(conf)
        _call(conf, env, "/v1/cni/gc", body)
        return 0, None, version
    try:
        _call(conf, env, "/v1/cni/status", body)
    except CniError as exc:
        raise CniError(PLUGIN_NOT_AVAILABLE, exc.msg, exc.details) from None
    return 0, None, version


def main(env: dict[str, str] | None = None, stdin: IO[bytes] | None = None, stdout: IO[str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    version = "1.0.0"
    try:
        raw = stdin.read(1 << 20)
        try:
            conf = json.loads(raw) if raw.strip() else None
            asked = conf.get("cniVersion") if isinstance(conf, dict) else None
            if isinstance(conf, dict) and not asked and env.get("CNI_COMMAND") != "VERSION":
                asked = DEFAULT_VERSION  # errors, like results, speak the configuration's version
            version = asked if isinstance(asked, str) and asked in SUPPORTED else version
        except (ValueError, RecursionError):
            pass
        code, out, version = run(env, raw)
    except Exception as exc:  # the edge: every failure becomes a CNI error object, never a traceback
        err = exc if isinstance(exc, CniError) else CniError(INTERNAL, f"internal error: {type(exc).__name__}: "
                                                                       f"{exc}"[:500])
        error = {"cniVersion": version, "code": err.code, "msg": err.msg}
        if err.details:
            error["details"] = err.details
        stdout.write(json.dumps(error) + "\n")
        print(f"cellgate-cni: {err.msg}" + (f" ({err.details})" if err.details else ""), file=sys.stderr)
        return 1
    if out is not None:
        stdout.write(json.dumps(out) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
