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
from typing import Any

from plugin.api.client import ApiError, Client
from plugin.config import Config, default_api_socket


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
        f"Datapath:     {st['datapath']} (compiled in {st['compile_ms']:.0f} ms, ready in {st['start_ms']:.0f} ms)",
        f"Sockets:      docker {st['plugin_socket']}, api {st['api_socket']}",
        f"Ranges:       {st['ranges']['ipv4']}  {st['ranges']['ipv6']}",
        f"Networks:     {st['networks']}",
        f"Endpoints:    {st['endpoints']}",
        f"Masquerade:   {'on' if st['masquerade'] else 'off'}",
        f"Drops:        {drops} packets",
    ]
    if st["counters"]:
        lines.append("")
        lines.append(_table([(c["name"], c["reason"], c["packets"], c["bytes"]) for c in st["counters"]],
                            ("VERDICT", "MEANING", "PACKETS", "BYTES")))
    _emit(args, st, "\n".join(lines))
    return 0


def _ep_rows(eps: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["id"][:12], e["network_id"][:12], e["interface"], e["ipv4"] or "-", e["ipv6"] or "-", e["mac"],
             e["state"]) for e in eps]


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    eps = _client(args).get("/v1/endpoints")
    _emit(args, eps, _table(_ep_rows(eps), ("ENDPOINT", "NETWORK", "INTERFACE", "IPV4", "IPV6", "MAC", "STATE")))
    return 0


def cmd_endpoint_get(args: argparse.Namespace) -> int:
    ep = _client(args).get(f"/v1/endpoints/{args.id}")
    lines = [f"{k + ':':<20} {v}" for k, v in ep.items() if k != "labels"]
    lines.append(f"{'labels:':<20} " + (", ".join(f"{k}={v}" for k, v in sorted(ep["labels"].items())) or "-"))
    _emit(args, ep, "\n".join(lines))
    return 0


def cmd_network_list(args: argparse.Namespace) -> int:
    nets = _client(args).get("/v1/networks")
    rows = [(n["id"][:12], ",".join(n["subnets"]), ",".join(n["gateways"]), n["endpoints"]) for n in nets]
    _emit(args, nets, _table(rows, ("NETWORK", "SUBNETS", "GATEWAYS", "ENDPOINTS")))
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
    for leak in report["leaked"]:
        done = " (released)" if args.release else ""
        lines.append(f"leaked    {leak['address']:<24} {leak['pool']}: {leak['reason']}{done}")
    for miss in report["missing"]:
        lines.append(f"missing   {miss['address']:<24} used by endpoint {miss['endpoint'][:12]} but not allocated")
    for dup in report["duplicates"]:
        lines.append(f"duplicate {dup['address']:<24} used by {', '.join(e[:12] for e in dup['endpoints'])}")
    for pool in report["unbound_pools"]:
        lines.append(f"note      pool {pool} is not used by a cellgate network")
    problems = bool(report["missing"] or report["duplicates"] or (report["leaked"] and not args.release))
    lines.append("IPAM is consistent with the live endpoints." if report["ok"] else
                 ("Leaks released." if not problems else "IPAM has problems (see above)."))
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


def cmd_cleanup(args: argparse.Namespace) -> int:
    from plugin.bootstrap import cleanup

    report = cleanup(Config.from_args(args, args.socket))
    lines = [
        f"links removed:    {', '.join(report['links']) or '-'}",
        f"routes removed:   {', '.join(report['routes']) or '-'}",
        f"iptables chains:  {'removed' if report['iptables'] else '-'}",
        f"pinned maps:      {', '.join(report['pins']) or '-'}",
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

    ipam = sub.add_parser("ipam", help="address management").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    ipam.add_parser("list", parents=[common], help="pools and allocations").set_defaults(func=cmd_ipam_list)
    check = ipam.add_parser("check", parents=[common], help="compare allocations with live endpoints")
    check.add_argument("--release", action="store_true", help="free leaked addresses")
    check.add_argument("--grace", type=float, default=60.0, help="ignore allocations younger than this (seconds)")
    check.set_defaults(func=cmd_ipam_check)

    mon = sub.add_parser("monitor", parents=[common], help="print datapath events as they happen")
    mon.add_argument("--type", choices=("drop",), default="", help="only events of this type")
    mon.add_argument("--endpoint", default="", help="only events of this endpoint (ID prefix)")
    mon.add_argument("--count", type=int, default=0, help="exit after this many events")
    mon.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds")
    mon.set_defaults(func=cmd_monitor)

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
