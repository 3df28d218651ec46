"""The proxy process: `python -m plugin.proxy --pin-dir P --filters F --port N [--events SOCK]
[--access-log FILE]`. Started, adopted and restarted by the agent (plugin/proxy/supervisor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

from plugin.proxy.flows import L7Event, Limits
from plugin.proxy.server import ProxyServer, marked_connector, transparent_listener
from plugin.proxy.source import KernelFlowSource

log = logging.getLogger(__name__)


class EventSink:
    """Events to the agent as datagrams (never blocking: a full socket loses the event) and,
    optionally, to a JSON-lines access log."""

    def __init__(self, path: str, access_log: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.log = open(access_log, "a", buffering=1) if access_log else None  # noqa: SIM115
        self.lost = 0

    def __call__(self, event: L7Event) -> None:
        data = json.dumps(event.to_json(), separators=(",", ":"))
        if self.log is not None:
            self.log.write(data + "\n")
        if self.path:
            try:
                self.sock.sendto(data.encode(), self.path)
            except OSError:
                self.lost += 1


async def serve(args: argparse.Namespace) -> None:
    source = KernelFlowSource(Path(args.pin_dir), Path(args.filters))
    sockets = [transparent_listener("127.0.0.1", args.port)]
    try:
        sockets.append(transparent_listener("::1", args.port))
    except OSError as exc:  # no IPv6 in this netns
        log.info("no IPv6 listener: %s", exc)
    server = ProxyServer(source, marked_connector(), EventSink(args.events, args.access_log), Limits(),
                         sockets=sockets)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("L7 proxy %d listening on port %d", os.getpid(), args.port)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cellgate-proxy")
    parser.add_argument("--pin-dir", required=True)
    parser.add_argument("--filters", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", default="")
    parser.add_argument("--access-log", default="")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s proxy %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
