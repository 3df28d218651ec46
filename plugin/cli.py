"""`cellgate` command line: runs the agent and talks to it through its REST API.

Tables by default, `-o json` everywhere. The agent is found through --socket or
CELLGATE_SOCK (default /var/run/cellgate/cellgate.sock).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from plugin.client import ApiError, Client
from plugin.config import Config, default_api_socket
from plugin.observe import cli as observe_cli


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, payload: Any, table: str) -> None:
    if args.output == "json":
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(table)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket or default_api_socket())


# -- commands ------------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    from plugin.bootstrap import run_agent

    return run_agent(Config.from_args(args, args.socket))


def cmd_status(args: argparse.Namespace) -> int:
    st = _client(args).get("/v1/status")
    drops = sum(c["packets"] for c in st["counters"] if c["drop"])
    lines = [
        f"Instance:     {st['instance']} (pid {st['pid']}, up {st['uptime']:.0f}s)",
        f"Datapath:     {st['datapath']} ("
        + ("its pinned programs reused" if st.get("datapath_reused") else f"compiled in {st['compile_ms']:.0f} ms")
        + f", ready in {st['start_ms']:.0f} ms)",
        f"Sockets:      docker {st['plugin_socket']}, api {st['api_socket']}",
        f"Ranges:       {st['ranges']['ipv4']}  {st['ranges']['ipv6']}",
        f"Networks:     {st['networks']}",
        f"Endpoints:    {st['endpoints']}",
        f"Masquerade:   {'on' if st['masquerade'] else 'off'}",
        f"Policy:       {st['policy']['enforcement']} enforcement, revision {st['policy']['revision']}, "
        f"{st['policy']['rules']} rules, {st['policy']['entries']} map entries, "
        f"{st['policy']['identities']} identities",
        f"Docker:       {st['docker']['host']} "
        f"({'following events' if st['docker']['following'] else 'NOT connected: labels unknown'})",
        f"Drops:        {drops} packets",
    ]
    kv = st.get("kvstore")
    if kv:
        node = kv["node"]
        lines.insert(-1, f"Node:         {node['name']} at {node['address']}, tunnel {node['tunnel']}, "
                         f"{kv['peers'] if kv['peers'] is not None else '?'} peers")
        health = "connected" if kv["connected"] else "NOT connected (cached state; new identities pending)"
        lines.insert(-1, f"KVStore:      {kv['backend']} {health}, revision {kv['last_revision']}, "
                         f"lease {kv['lease_id']} ttl {kv['lease_ttl_left']}/{kv['lease_ttl']}s"
                         + (f", CLASH: {kv['clash']}" if kv["clash"] else "")
                         + (f", last error: {kv['last_error']}" if kv["last_error"] and not kv["connected"] else ""))
    if st["counters"]:
        lines.append("")
        lines.append(_table([(c["name"], c["reason"], c["packets"], c["bytes"]) for c in st["counters"]],
                            ("VERDICT", "MEANING", "PACKETS", "BYTES")))
    _emit(args, st, "\n".join(lines))
    return 0


def _ep_rows(eps: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["id"][:12], e["network_id"][:12], e["interface"], e["ipv4"] or "-", e["ipv6"] or "-",
             e["identity"], e["state"], ",".join(x.split(":", 1)[1] for x in e["labels"])[:40] or "-")
            for e in eps]


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    eps = _client(args).get("/v1/endpoints")
    _emit(args, eps, _table(_ep_rows(eps), ("ENDPOINT", "NETWORK", "INTERFACE", "IPV4", "IPV6", "IDENTITY", "STATE",
                                            "LABELS")))
    return 0


def cmd_endpoint_get(args: argparse.Namespace) -> int:
    ep = _client(args).get(f"/v1/endpoints/{args.id}")
    lines = [f"{k + ':':<20} {v}" for k, v in ep.items() if k not in ("labels", "policy")]
    lines.append(f"{'labels:':<20} " + (", ".join(ep["labels"]) or "- (not known yet)"))
    pol = ep.get("policy") or {}
    if pol:
        enf = pol["enforcement"]
        lines.append(f"{'identity labels:':<20} " + ", ".join(pol["identity_labels"]))
        lines.append(f"{'policy:':<20} ingress {'enforced' if enf['ingress'] else 'open'}, "
                     f"egress {'enforced' if enf['egress'] else 'open'}; revision {pol['revision']}, "
                     f"{pol['entries']} map entries")
    _emit(args, ep, "\n".join(lines))
    return 0


def cmd_network_list(args: argparse.Namespace) -> int:
    nets = _client(args).get("/v1/networks")
    rows = [(n["id"][:12], n["name"] or "-", n["origin"], ",".join(n["subnets"]), ",".join(n["gateways"]),
             n["endpoints"]) for n in nets]
    _emit(args, nets, _table(rows, ("NETWORK", "NAME", "ORIGIN", "SUBNETS", "GATEWAYS", "ENDPOINTS")))
    return 0


def cmd_network_rm(args: argparse.Namespace) -> int:
    net = _client(args).call("DELETE", f"/v1/networks/{quote(args.network, safe='')}")
    _emit(args, net, f"Removed CNI network {net['name']} ({net['id'][:12]}, {', '.join(net['subnets'])})")
    return 0


def cmd_ipam_list(args: argparse.Namespace) -> int:
    data = _client(args).get("/v1/ipam")
    rows = []
    for pool in data["pools"]:
        for a in pool["allocations"]:
            rows.append((pool["subnet"], a["address"], a["kind"], (a["owner"] or "-")[:12],
                         (pool["network_id"] or "-")[:12]))
    header = f"Host ranges: {data['ranges']['ipv4']}  {data['ranges']['ipv6']}\n\n"
    _emit(args, data, header + _table(rows, ("POOL", "ADDRESS", "KIND", "OWNER", "NETWORK")))
    return 0


def cmd_ipam_check(args: argparse.Namespace) -> int:
    report = _client(args).post("/v1/ipam/check", {"release": args.release, "grace": args.grace})
    lines = []
    stale = report.get("stale") or {}
    gone = " (removed)" if stale.get("removed") else ""
    for kind, key in (("network", "networks"), ("endpoint", "endpoints"), ("pool", "pools")):
        for item in stale.get(key, []):
            lines.append(f"stale     {kind} {item[kind][:24]:<16} {item['reason']}{gone}")
    if not str(report.get("docker", "")).startswith(("reachable", "not followed")):
        lines.append(f"note      Docker is {report.get('docker')}: its networks and endpoints were not judged")
    for leak in report["leaked"]:
        done = " (released)" if args.release else ""
        lines.append(f"leaked    {leak['address']:<24} {leak['pool']}: {leak['reason']}{done}")
    for miss in report["missing"]:
        lines.append(f"missing   {miss['address']:<24} used by endpoint {miss['endpoint'][:12]} but not allocated")
    for dup in report["duplicates"]:
        lines.append(f"duplicate {dup['address']:<24} used by {', '.join(e[:12] for e in dup['endpoints'])}")
    for pool in report["unbound_pools"]:
        lines.append(f"note      pool {pool} is not used by a cellgate network")
    stale_left = any(stale.get(k) for k in ("networks", "endpoints", "pools")) and not stale.get("removed")
    problems = bool(report["missing"] or report["duplicates"] or (report["leaked"] and not args.release)
                    or stale_left)
    lines.append("IPAM is consistent with the live endpoints and the runtimes." if report["ok"] else
                 ("Leaks and stale state removed." if not problems else "IPAM has problems (see above)."))
    _emit(args, report, "\n".join(lines))
    return 1 if problems else 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from datapath.events import format_line

    query = []
    if args.type:
        query.append(f"type={args.type}")
    if args.endpoint:
        query.append(f"endpoint={args.endpoint}")
    url = "/v1/monitor" + ("?" + "&".join(query) if query else "")
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = 0
    try:
        for ev in _client(args).stream(url):
            if deadline is not None and time.monotonic() > deadline:
                break
            if ev.get("type") == "hello":
                if args.output != "json":
                    print(f"Listening for {args.type or 'all'} events... (Ctrl-C to stop)", file=sys.stderr, flush=True)
                continue
            print(json.dumps(ev, sort_keys=True) if args.output == "json" else format_line(ev), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return 0 if not args.count or seen >= args.count else 1


def load_policy_file(path: str) -> Any:
    """JSON or YAML (several YAML documents become a list), from a file or '-' for stdin, bounded
    and parsed as the agent parses it (plugin.policyfile): InvalidRequest when it is not a policy."""
    from plugin.policyfile import load

    return load(path)[0]


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Offline, and the same verdict and message as `policy import` (both parse through policyfile.load)."""
    from datapath.errors import InvalidRequest
    from plugin.policyfile import load

    try:
        data, rules = load(args.file)
    except InvalidRequest as exc:
        _emit(args, {"valid": False, "error": str(exc)}, f"{args.file}: invalid: {exc}")
        return 1
    if args.against_flows:
        return _preview(args, data)
    _emit(args, {"valid": True, "rules": len(rules)}, f"{args.file}: valid, {len(rules)} rule(s)")
    return 0


def cmd_policy_import(args: argparse.Namespace) -> int:
    """Parsed here first, as `policy check` does (a refusal never reaches the agent), then sent."""
    from plugin.policyfile import load

    data, _ = load(args.file)
    if args.dry_run:
        return _preview(args, data)
    out = _client(args).post("/v1/policy", {"rules": data})
    _emit(args, out, f"Revision: {out['revision']}")
    return 0


def _preview(args: argparse.Namespace, data: Any) -> int:
    """What importing `data` would change for the flows seen lately (nothing is imported)."""
    out = _client(args).post("/v1/policy/preview", {"rules": data, "since": args.since})
    lines = [f"{out['flows']} flow(s) seen since {args.since} judged against the policy with {out['rules']} more "
             f"rule(s): {len(out['newly_denied'])} group(s) newly denied, {len(out['newly_allowed'])} newly allowed, "
             f"{out['unchanged']} flow(s) unchanged. Nothing was imported."]
    for name, title in (("newly_denied", "Would be DENIED"), ("newly_allowed", "Would be newly ALLOWED")):
        if out[name]:
            lines.append(f"\n{title}:")
            lines.append(_table([(g["from"], g["to"], g["port"], g["l7"] or "-", g["flows"]) for g in out[name]],
                                ("FROM", "TO", "PORT", "L7", "FLOWS")))
    _emit(args, out, "\n".join(lines))
    return 0


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    body = {"since": args.since}
    if args.selector:
        body["selector"] = args.selector
    out = _client(args).post("/v1/policy/suggest", body)
    if not out["rules"]:
        print(f"cellgate: no allowed flow to a local endpoint{' matching ' + args.selector if args.selector else ''} "
              f"in the last {args.since} ({out['flows']} flows kept); allowed flows are recorded while "
              "`cellgate observe -f` or the map page runs, or with the agent's --record-allowed-flows",
              file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(out["rules"], indent=2))
    else:
        import yaml

        print(f"# least-privilege policy for {out['flows']} flows seen in the last {args.since}")
        print(yaml.safe_dump(out["rules"], sort_keys=False), end="")
    return 0


def cmd_policy_get(args: argparse.Namespace) -> int:
    query = "?labels=" + ",".join(args.labels) if args.labels else ""
    out = _client(args).get("/v1/policy" + query)
    text = json.dumps([r["rule"] for r in out["rules"]], indent=2) + f"\nRevision: {out['revision']}"
    _emit(args, out, text)
    return 0


def cmd_policy_delete(args: argparse.Namespace) -> int:
    if not args.all and not args.labels:
        raise ValueError("give --labels k=v ... or --all")
    body: dict[str, Any] = {"all": True} if args.all else {"labels": args.labels}
    out = _client(args).call("DELETE", "/v1/policy", body)
    _emit(args, out, f"Deleted {out['deleted']} rule(s)\nRevision: {out['revision']}")
    return 0


def cmd_policy_wait(args: argparse.Namespace) -> int:
    out = _client(args).get(f"/v1/policy/wait?revision={args.revision}&timeout={args.timeout}")
    _emit(args, out, f"Revision {out['revision']} is enforced on {out['endpoints']} endpoint(s)")
    return 0


def _party(args: argparse.Namespace, side: str) -> dict[str, str]:
    chosen = [(kind, getattr(args, f"{side}_{kind}")) for kind in ("labels", "endpoint", "identity", "ip")
              if getattr(args, f"{side}_{kind}")]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --{side}, --{side}-endpoint, --{side}-identity, --{side}-ip")
    kind, value = chosen[0]
    return {kind: value}


def cmd_policy_trace(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"src": _party(args, "src"), "dst": _party(args, "dst"), "dport": args.dport}
    if args.http_method or args.http_path or args.header or args.http_host:
        body["http"] = {"method": args.http_method or "GET", "path": args.http_path or "/",
                        "host": args.http_host, "headers": args.header}
    if args.kafka_api_key or args.kafka_topic:
        body["kafka"] = {"apiKey": args.kafka_api_key or "produce", "apiVersion": args.kafka_api_version,
                         "topics": args.kafka_topic, **({"clientID": args.kafka_client_id}
                                                        if args.kafka_client_id is not None else {})}
    out = _client(args).post("/v1/policy/trace", body)
    _emit(args, out, "\n".join(out["lines"]))
    return 0


def _labels_text(labels: list[str]) -> str:
    """Labels for a table: a CIDR identity by its own prefix (the longest), not its every parent."""
    cidrs = [lb for lb in labels if lb.startswith("cidr:")]
    if len(cidrs) > 1:
        longest = max(cidrs, key=lambda lb: int(lb.rsplit("/", 1)[-1]) if lb.rsplit("/", 1)[-1].isdigit() else -1)
        labels = [lb for lb in labels if not lb.startswith("cidr:") or lb == longest]
    return ", ".join(labels)


def cmd_identity_list(args: argparse.Namespace) -> int:
    out = _client(args).get("/v1/identities")
    if any("nodes" in i for i in out):
        rows = [(i["id"], i["endpoints"], ",".join(i.get("nodes", [])) or "-", _labels_text(i["labels"]))
                for i in out]
        _emit(args, out, _table(rows, ("ID", "ENDPOINTS", "NODES", "LABELS")))
        return 0
    rows = [(i["id"], i["endpoints"], _labels_text(i["labels"])) for i in out]
    _emit(args, out, _table(rows, ("ID", "ENDPOINTS", "LABELS")))
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    out = _client(args).get("/v1/nodes")
    rows = [(n["name"] + (" (local)" if n["local"] else ""), n["address"] or "-", n["ipv4_range"], n["ipv6_range"],
             n["tunnel"] or "-", n["endpoints"], n.get("clash") or "") for n in out]
    _emit(args, out, _table(rows, ("NAME", "ADDRESS", "IPV4 RANGE", "IPV6 RANGE", "TUNNEL", "ENDPOINTS", "CLASH")))
    return 0


def cmd_bpf_ipcache(args: argparse.Namespace) -> int:
    out = _client(args).get("/v1/bpf/ipcache")
    rows = [(e["prefix"], e["identity"], e["tunnel_endpoint"] or "-", _labels_text(e["labels"])[:60]) for e in out]
    _emit(args, out, _table(rows, ("PREFIX", "IDENTITY", "TUNNEL ENDPOINT", "LABELS")))
    return 0


def cmd_identity_get(args: argparse.Namespace) -> int:
    out = _client(args).get(f"/v1/identities/{args.id}")
    _emit(args, out, f"{out['id']}\t" + ", ".join(out["labels"]))
    return 0


def cmd_bpf_policy(args: argparse.Namespace) -> int:
    out = _client(args).get(f"/v1/bpf/policy/{args.endpoint}")
    rows = [(e["direction"], e["peer"] or "any", _labels_text(e["peer_labels"])[:60], e["protocol"], e["ports"],
             e["verdict"], e["rule"] or "-") for e in out["entries"]]
    head = f"Endpoint {out['endpoint'][:12]}, identity {out['identity']}\n"
    _emit(args, out, head + _table(rows, ("DIRECTION", "PEER", "PEER LABELS", "PROTO", "PORTS", "VERDICT", "RULE")))
    return 0


def cmd_bpf_ct(args: argparse.Namespace) -> int:
    out = _client(args).get("/v1/bpf/ct")
    rows = [(e["protocol"], f"{e['src']}:{e['sport']}", f"{e['dst']}:{e['dport']}", e["packets"], e["bytes"],
             f"{e['src_identity']}->{e['dst_identity']}", ",".join(e["flags"]) or "-", e["expires_in"])
            for e in out]
    _emit(args, out, _table(rows, ("PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "IDENTITIES", "FLAGS",
                                   "EXPIRES")))
    return 0


def _service_rows(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(s["name"], s["frontend"], (s["selector"] and f"{s['selector']} :{s['target_port']}") or "-",
             ", ".join(s["active_backends"]) or "(none: refused)", s["node"]) for s in items]


SERVICE_HEADER = ("NAME", "FRONTEND", "SELECTOR", "BACKENDS", "NODE")


def _service_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in ("frontend", "name", "selector"):
        if getattr(args, field, None):
            body[field] = getattr(args, field)
    if args.backends is not None:
        body["backends"] = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.target_port:
        body["target_port"] = args.target_port
    return body


def cmd_service_create(args: argparse.Namespace) -> int:
    if (args.backends is None) == (not args.selector):
        raise ValueError("give --backends IP:PORT[,...] or --selector k=v --target-port N")
    out = _client(args).post("/v1/services", _service_body(args))
    _emit(args, out, _table(_service_rows([out]), SERVICE_HEADER))
    return 0


def cmd_service_update(args: argparse.Namespace) -> int:
    out = _client(args).call("PUT", f"/v1/services/{quote(args.name, safe='')}", _service_body(args))
    _emit(args, out, _table(_service_rows([out]), SERVICE_HEADER))
    return 0


def cmd_service_list(args: argparse.Namespace) -> int:
    out = _client(args).get("/v1/services")
    _emit(args, out, _table(_service_rows(out), SERVICE_HEADER))
    return 0


def cmd_service_get(args: argparse.Namespace) -> int:
    out = _client(args).get(f"/v1/services/{quote(args.name, safe='')}")
    _emit(args, out, _table(_service_rows([out]), SERVICE_HEADER))
    return 0


def cmd_service_delete(args: argparse.Namespace) -> int:
    out = _client(args).call("DELETE", f"/v1/services/{quote(args.name, safe='')}")
    _emit(args, out, f"Deleted service {out['name']} ({out['frontend']})")
    return 0


def cmd_install_cni(args: argparse.Namespace) -> int:
    from plugin.cni.install import install

    path, changed = install(Path(args.dir))
    _emit(args, {"path": str(path), "changed": changed}, f"{path} {'installed' if changed else 'is up to date'}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from plugin.bootstrap import cleanup

    report = cleanup(Config.from_args(args, args.socket))
    lines = [
        f"links removed:    {', '.join(report['links']) or '-'}",
        f"routes removed:   {', '.join(report['routes']) or '-'}",
        f"iptables chains:  {'removed' if report['iptables'] else '-'}",
        f"pinned maps:      {', '.join(report['pins']) or '-'}",
        f"socket programs:  {', '.join(report['socket_programs']) or '-'}",
        f"sockets removed:  {', '.join(report['sockets']) or '-'}",
        f"state removed:    {report['state'] or '-'}",
    ]
    _emit(args, report, "\n".join(lines))
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    common.add_argument("--socket", default="", help="agent API socket [CELLGATE_SOCK]")

    parser = argparse.ArgumentParser(prog="cellgate", description="Container networking with an eBPF datapath.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", parents=[common], help="run the agent (foreground)")
    Config.add_arguments(agent)
    agent.set_defaults(func=cmd_agent)

    sub.add_parser("status", parents=[common], help="agent health and datapath counters").set_defaults(func=cmd_status)

    ep = sub.add_parser("endpoint", help="endpoints").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    ep.add_parser("list", parents=[common], help="list endpoints").set_defaults(func=cmd_endpoint_list)
    get = ep.add_parser("get", parents=[common], help="show one endpoint (ID, ID prefix, interface or address)")
    get.add_argument("id")
    get.set_defaults(func=cmd_endpoint_get)

    net = sub.add_parser("network", help="networks").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    net.add_parser("list", parents=[common], help="list networks").set_defaults(func=cmd_network_list)
    rm = net.add_parser("rm", parents=[common], help="remove a CNI network without attachments (Docker's: "
                        "docker network rm)")
    rm.add_argument("network", metavar="NAME|ID")
    rm.set_defaults(func=cmd_network_rm)

    ipam = sub.add_parser("ipam", help="address management").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    ipam.add_parser("list", parents=[common], help="pools and allocations").set_defaults(func=cmd_ipam_list)
    check = ipam.add_parser("check", parents=[common], help="compare allocations with live endpoints")
    check.add_argument("--release", action="store_true", help="free leaked addresses")
    check.add_argument("--grace", type=float, default=60.0, help="ignore allocations younger than this (seconds)")
    check.set_defaults(func=cmd_ipam_check)

    mon = sub.add_parser("monitor", parents=[common], help="print datapath events as they happen")
    mon.add_argument("--type", choices=("drop", "verdict", "trace", "l7"), default="",
                     help="only events of this type (trace events are produced only while asked for)")
    mon.add_argument("--endpoint", default="", help="only events of this endpoint (ID prefix)")
    mon.add_argument("--count", type=int, default=0, help="exit after this many events")
    mon.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds")
    mon.set_defaults(func=cmd_monitor)
    observe_cli.add_parser(sub)

    pol = sub.add_parser("policy", help="policy rules").add_subparsers(dest="sub", required=True,
                                                                    metavar="SUBCOMMAND")
    p = pol.add_parser("import", parents=[common], help="add rules from a JSON or YAML file ('-' = stdin)")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true",
                   help="import nothing: show which flows seen lately the rules would deny or newly allow")
    p.add_argument("--since", default="10m", help="with --dry-run: the flows of this window (default 10m)")
    p.set_defaults(func=cmd_policy_import)
    p = pol.add_parser("check", parents=[common], help="validate a policy file offline (exit 1 if invalid)")
    p.add_argument("file")
    p.add_argument("--against-flows", action="store_true",
                   help="also ask the agent which flows seen lately the rules would deny or newly allow")
    p.add_argument("--since", default="10m", help="with --against-flows: the flows of this window (default 10m)")
    p.set_defaults(func=cmd_policy_check)
    p = pol.add_parser("suggest", parents=[common],
                       help="the least-privilege policy that keeps every flow seen lately allowed (YAML; -o json)")
    p.add_argument("--selector", default="", help="only for endpoints with these labels, e.g. app=backend")
    p.add_argument("--since", default="10m", help="the flows of this window (default 10m)")
    p.set_defaults(func=cmd_policy_suggest)
    p = pol.add_parser("get", parents=[common], help="rules in force, optionally only those with labels")
    p.add_argument("--labels", nargs="*", default=[], metavar="K=V")
    p.set_defaults(func=cmd_policy_get)
    p = pol.add_parser("delete", parents=[common], help="delete rules by labels, or all")
    p.add_argument("--labels", nargs="*", default=[], metavar="K=V")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_policy_delete)
    p = pol.add_parser("wait", parents=[common], help="return once every endpoint enforces REVISION")
    p.add_argument("revision", type=int)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_policy_wait)
    p = pol.add_parser("trace", parents=[common], help="explain the verdict for a flow, rule by rule")
    for side in ("src", "dst"):
        p.add_argument(f"--{side}", dest=f"{side}_labels", default="", metavar="LABELS",
                       help="labels, comma separated (e.g. app=frontend)")
        p.add_argument(f"--{side}-endpoint", dest=f"{side}_endpoint", default="", metavar="ID")
        p.add_argument(f"--{side}-identity", dest=f"{side}_identity", default="", metavar="N")
        p.add_argument(f"--{side}-ip", dest=f"{side}_ip", default="", metavar="ADDRESS",
                       help="an address, resolved as the datapath does (endpoint, ipcache prefix, else world)")
    p.add_argument("--dport", default="", help="destination port and protocol, e.g. 80/tcp")
    p.add_argument("--http-method", default="", help="trace an HTTP request: its method (GET when a path is given)")
    p.add_argument("--http-path", default="", help="... its path, e.g. /public/x")
    p.add_argument("--http-host", default="", help="... its Host")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="... a header (repeatable)")
    p.add_argument("--kafka-api-key", default="", help="trace a Kafka request: its API key (produce, fetch, ...)")
    p.add_argument("--kafka-api-version", type=int, default=0)
    p.add_argument("--kafka-topic", action="append", default=[], metavar="TOPIC", help="... a topic (repeatable)")
    p.add_argument("--kafka-client-id", default=None)
    p.set_defaults(func=cmd_policy_trace)

    ident = sub.add_parser("identity", help="security identities").add_subparsers(dest="sub", required=True,
                                                                                  metavar="SUBCOMMAND")
    ident.add_parser("list", parents=[common], help="every identity with its labels").set_defaults(
        func=cmd_identity_list)
    p = ident.add_parser("get", parents=[common], help="one identity")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_identity_get)

    bpf = sub.add_parser("bpf", help="datapath state").add_subparsers(dest="sub", required=True, metavar="MAP")
    bpol = bpf.add_parser("policy", help="policy map").add_subparsers(dest="op", required=True, metavar="OP")
    p = bpol.add_parser("get", parents=[common], help="policy entries enforced for an endpoint")
    p.add_argument("endpoint")
    p.set_defaults(func=cmd_bpf_policy)
    bip = bpf.add_parser("ipcache", help="addresses and prefixes with their identity").add_subparsers(
        dest="op", required=True, metavar="OP")
    bip.add_parser("list", parents=[common], help="the kernel's ipcache").set_defaults(func=cmd_bpf_ipcache)
    nodes = sub.add_parser("node", help="cluster nodes").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    nodes.add_parser("list", parents=[common], help="nodes registered in the kvstore").set_defaults(func=cmd_node_list)
    bct = bpf.add_parser("ct", help="connection tracking").add_subparsers(dest="op", required=True, metavar="OP")
    bct.add_parser("list", parents=[common], help="tracked flows").set_defaults(func=cmd_bpf_ct)

    svc = sub.add_parser("service", help="load-balanced services (VIPs)").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    for op, helptext in (("create", "balance a VIP:PORT over backends (by address or by labels)"),
                         ("update", "change a service's backends or selector")):
        p = svc.add_parser(op, parents=[common], help=helptext)
        if op == "update":
            p.add_argument("name", help="service name")
        p.add_argument("--frontend", required=op == "create", help="VIP:PORT[/tcp|udp] ([IPv6]:PORT for IPv6)")
        p.add_argument("--backends", default=None, help="IP:PORT[,IP:PORT...]")
        p.add_argument("--selector", default="", help="endpoints with these labels, e.g. app=web[,tier=x]")
        p.add_argument("--target-port", type=int, default=0, help="the selected endpoints' port")
        if op == "create":
            p.add_argument("--name", default="", help="service name [default: from the frontend]")
        p.set_defaults(func=cmd_service_create if op == "create" else cmd_service_update)
    svc.add_parser("list", parents=[common], help="every service and its backends").set_defaults(func=cmd_service_list)
    for op, fn in (("get", cmd_service_get), ("delete", cmd_service_delete)):
        p = svc.add_parser(op, parents=[common], help=f"{op} one service")
        p.add_argument("name", help="service name")
        p.set_defaults(func=fn)

    inst = sub.add_parser("install-cni", parents=[common], help="install the cellgate-cni plugin for CNI runtimes")
    inst.add_argument("--dir", default="/opt/cni/bin", help="CNI plugin directory [default /opt/cni/bin]")
    inst.set_defaults(func=cmd_install_cni)

    clean = sub.add_parser("cleanup", parents=[common], help="remove everything this instance created on the host")
    Config.add_arguments(clean)
    clean.set_defaults(func=cmd_cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ApiError as exc:
        print(f"cellgate: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"cellgate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from datapath.errors import CellgateError

        if isinstance(exc, CellgateError):
            print(f"cellgate: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
