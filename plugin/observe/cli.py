"""`cellgate observe`: the agent's flows with `hubble observe`'s flags and meaning, from one agent or
merged by time from several (`--node SOCKET`, one per node). Talks to GET /v1/flows only."""

from __future__ import annotations

import argparse
import heapq
import json
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from datapath.flows import FilterBuilder, FilterError, format_compact, format_table
from plugin.client import Client
from plugin.config import default_api_socket

# flag (as typed) → FilterBuilder name; each may be given several times (values ORed)
FILTER_FLAGS = {
    "--ip": "ip", "--from-ip": "from_ip", "--to-ip": "to_ip",
    "--label": "label", "--from-label": "from_label", "--to-label": "to_label",
    "--identity": "identity", "--from-identity": "from_identity", "--to-identity": "to_identity",
    "--port": "port", "--from-port": "from_port", "--to-port": "to_port",
    "--pod": "pod", "--from-pod": "from_pod", "--to-pod": "to_pod",
    "--to-service": "to_service", "--protocol": "protocol", "--verdict": "verdict", "--type": "type",
    "--http-status": "http_status", "--http-method": "http_method", "--http-path": "http_path",
    "--node-name": "node_name", "--traffic-direction": "traffic_direction", "--ip-version": "ip_version",
}
HELP = {
    "ip": "address or CIDR on either side", "label": "label selector (app=web, reserved:world) on either side",
    "identity": "identity number on either side", "port": "port on either side",
    "pod": "endpoint ID prefix on either side", "to_service": "service name of the destination",
    "protocol": "tcp, udp, icmp, icmpv4, icmpv6, http, kafka", "verdict": "FORWARDED, DROPPED, REDIRECTED, ...",
    "type": "drop, trace, policy-verdict, l7", "http_status": "404, or a class: 5+", "http_method": "GET, POST, ...",
    "http_path": "regular expression on the path", "node_name": "the node that saw the flow",
    "traffic_direction": "ingress or egress", "ip_version": "4 or 6",
}


class _Ordered(argparse.Action):
    """Keeps every filter flag in command-line order (`--not` applies to the next one)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.filters = [*getattr(namespace, "filters", []), (self.dest, values)]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("observe", help="recent and live flows, with Hubble's filters",
                       description="Flows as `hubble observe` shows them: --last N (default 20), --since/--until, "
                                   "-f to follow; filters of one flag are ORed, different flags ANDed, --not inverts "
                                   "the next filter.")
    p.add_argument("--socket", default="", help="agent API socket [CELLGATE_SOCK]")
    p.add_argument("--node", action="append", default=[], metavar="SOCKET",
                   help="also the flows of the agent at SOCKET (another node); merged by time")
    p.add_argument("-o", "--output", choices=("compact", "table", "json"), default="compact",
                   help="compact lines, a table, or one Hubble GetFlowsResponse JSON object per line")
    p.add_argument("--print-node-name", action="store_true", help="show the node of each flow")
    p.add_argument("--last", type=int, default=0, help="the last N flows (default 20 without --since/--follow)")
    p.add_argument("--first", type=int, default=0, help="the first N flows kept")
    p.add_argument("--since", default="", help="a duration ago (5m, 1h30m) or an RFC 3339 time")
    p.add_argument("--until", default="", help="likewise")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("--not", dest="not", nargs=0, action=_Ordered, help="the next filter excludes")
    for flag, name in FILTER_FLAGS.items():
        base = name.split("_", 1)[1] if name.startswith(("from_", "to_")) and name != "to_service" else name
        text = HELP.get(name) or HELP.get(base, "")
        if name.startswith("from_"):
            text = text.replace("on either side", "of the source")
        elif name.startswith("to_") and name != "to_service":
            text = text.replace("on either side", "of the destination")
        p.add_argument(flag, dest=name, action=_Ordered, metavar="VALUE", help=text)
    p.set_defaults(func=cmd_observe, filters=[])


def _query(args: argparse.Namespace) -> dict[str, str]:
    builder = FilterBuilder()
    for name, text in args.filters:
        if name == "not":
            builder.negate_next()
            continue
        if name.endswith("identity") and not str(text).isdigit():
            raise FilterError(f"--{name.replace('_', '-')}: {text!r} is not an identity number")
        builder.add(name, int(text) if name.endswith("identity") else text)
    q = builder.query()
    out: dict[str, str] = {}
    if q.allow:
        out["allowlist"] = json.dumps([f.to_json() for f in q.allow])
    if q.deny:
        out["denylist"] = json.dumps([f.to_json() for f in q.deny])
    for name in ("last", "first"):
        if getattr(args, name):
            out[name] = str(getattr(args, name))
    for name in ("since", "until"):
        if getattr(args, name):
            out[name] = getattr(args, name)
    if args.follow:
        out["follow"] = "true"
    return out


def _merged(clients: list[Client], url: str, follow: bool) -> Iterator[dict[str, Any]]:
    """The flows of every agent: merged by time when reading history; as they come when following."""
    if len(clients) == 1:
        yield from clients[0].stream(url, idle_timeout=30)
        return
    if not follow:
        yield from heapq.merge(*(list(c.stream(url, idle_timeout=30)) for c in clients),
                               key=lambda r: str(r.get("time", "")))
        return
    lines: queue.Queue[dict[str, Any] | BaseException] = queue.Queue(maxsize=4096)

    def pump(client: Client) -> None:
        try:
            for line in client.stream(url, idle_timeout=30):
                lines.put(line)
        except BaseException as exc:
            lines.put(exc)

    for c in clients:
        threading.Thread(target=pump, args=(c,), daemon=True).start()
    while True:
        item = lines.get()
        if isinstance(item, BaseException):
            raise item
        yield item


def cmd_observe(args: argparse.Namespace) -> int:
    if args.output == "table" and args.follow:
        print("cellgate observe: -o table cannot follow (give compact or json)", file=sys.stderr)
        return 2
    url = "/v1/flows?" + urlencode(_query(args))  # a bad filter raises FilterError (a ValueError): exit 2
    clients = [Client(s) for s in [args.socket or default_api_socket(), *args.node]]
    node = args.print_node_name or len(clients) > 1
    try:
        if args.output == "json" and len(clients) == 1:  # one agent: its lines as they come, unparsed
            out = sys.stdout.buffer
            for raw in clients[0].stream_lines(url, idle_timeout=30):
                out.write(raw)
                if args.follow:
                    out.flush()
            out.flush()
            return 0
        if args.output == "table":
            print(format_table(list(_merged(clients, url, False)), node))
            return 0
        for line in _merged(clients, url, args.follow):
            print(json.dumps(line) if args.output == "json" else format_compact(line, node), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0
