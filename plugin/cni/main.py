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
import sys
from typing import IO, Any

from plugin.cni import codes
from plugin.cni.codes import (
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_ENV,
    PLUGIN_NOT_AVAILABLE,
    TRY_AGAIN,
    CniError,
)
from plugin.cni.result import format_result, version_tuple
from plugin.cni.validate import (
    DEFAULT_VERSION,
    SUPPORTED,
    attachments,
    check_config,
    check_env,
    check_prev_result,
    check_runtime_config,
    check_static,
    labels_from,
    parse_cni_args,
)

DEFAULT_SOCKET = "/var/run/cellgate/cellgate.sock"


def _call(conf: dict[str, Any], env: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    from plugin.client import AgentUnreachable, ApiError, Client

    sock = str(conf.get("socket") or env.get("CELLGATE_SOCK") or DEFAULT_SOCKET)
    try:
        return Client(sock, timeout=60).post(path, body)
    except AgentUnreachable as exc:
        raise CniError(TRY_AGAIN, "the cellgate agent is not reachable", str(exc)) from None
    except ApiError as exc:
        code = codes.code_for_status(exc.status, exc.cni_code)
        raise CniError(code, str(exc)) from None


def run(env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, JSON to print or None, version) for one invocation."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set")
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise CniError(codes.DECODE_FAILURE, f"cannot decode the network configuration: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(codes.DECODE_FAILURE, "the network configuration must be a JSON object")
    if command == "VERSION":
        asked = conf["cniVersion"] if isinstance(conf.get("cniVersion"), str) else "1.0.0"
        return 0, {"cniVersion": asked, "supportedVersions": list(SUPPORTED)}, asked
    if command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command[:40]!r}")
    version = check_config(conf)
    if command in ("CHECK",) and version_tuple(version) < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"configuration version {version} does not allow CHECK")
    if command in ("GC", "STATUS") and version_tuple(version) < (1, 1, 0):
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
                ipaddress.ip_interface(cni_args["IP"])  # an address, or one with a prefix length (10.1.0.5/24)
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
