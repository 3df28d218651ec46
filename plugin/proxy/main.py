"""The proxy process: `python -m plugin.proxy --pin-dir P --filters F --port N [--events SOCK]
[--access-log FILE] [--workers W]`. Started, adopted and restarted by the agent
(plugin/proxy/supervisor.py). With W > 1 it forks W - 1 workers that bind their own listeners on
the same port (SO_REUSEPORT): one event loop per core. It restarts a worker that dies, and the
workers end with it (PR_SET_PDEATHSIG), so the agent supervises one process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
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


def loop_import(module: str) -> asyncio.Future[object]:
    return asyncio.get_running_loop().run_in_executor(None, importlib.import_module, module)


async def serve(args: argparse.Namespace) -> None:
    source = KernelFlowSource(Path(args.pin_dir), Path(args.filters))
    reuse = args.workers > 1 or args.reuseport
    sockets = [transparent_listener("127.0.0.1", args.port, reuseport=reuse)]
    try:
        sockets.append(transparent_listener("::1", args.port, reuseport=reuse))
    except OSError as exc:  # no IPv6 in this netns
        log.info("no IPv6 listener: %s", exc)
    server = ProxyServer(source, marked_connector(), EventSink(args.events, args.access_log), Limits(),
                         sockets=sockets)
    await server.start()
    # kafka-python takes most of the start; the listeners are up already, load it beside them
    warm = loop_import("plugin.proxy.kafka")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("L7 proxy %d listening on port %d", os.getpid(), args.port)
    await stop.wait()
    await server.close()
    await asyncio.wait([warm])  # (an import error shows again at the first Kafka flow)


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """A worker ends with the proxy that started it (SIGTERM when its parent goes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it went before prctl took effect
        raise SystemExit(0)


def _spawn_worker(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "plugin.proxy", *argv, "--workers", "1", "--reuseport",
                             "--worker-of", str(os.getpid())], stdin=subprocess.DEVNULL)


async def _serve_with_workers(args: argparse.Namespace, argv: list[str]) -> None:
    """Serve, with args.workers - 1 worker processes on the same port, each replaced when it exits."""
    workers = {w.pid: w for w in (_spawn_worker(argv) for _ in range(args.workers - 1))}
    loop = asyncio.get_running_loop()

    def reap() -> None:
        for pid, w in list(workers.items()):
            if w.poll() is not None:
                del workers[pid]
                log.error("L7 proxy worker %d exited (%s); starting another", pid, w.returncode)
                new = _spawn_worker(argv)
                workers[new.pid] = new

    loop.add_signal_handler(signal.SIGCHLD, reap)
    try:
        await serve(args)
    finally:
        loop.remove_signal_handler(signal.SIGCHLD)
        for w in workers.values():
            w.terminate()
        for w in workers.values():
            try:
                w.wait(5)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cellgate-proxy")
    parser.add_argument("--pin-dir", required=True)
    parser.add_argument("--filters", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", default="")
    parser.add_argument("--access-log", default="")
    parser.add_argument("--workers", type=int, default=1, help="event loops (processes) on the port")
    parser.add_argument("--reuseport", action="store_true", help="bind with SO_REUSEPORT (a worker)")
    parser.add_argument("--worker-of", type=int, default=0, help="the proxy process this worker ends with")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s proxy %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be between 1 and 64")
    if args.worker_of:
        _die_with(args.worker_of)
    if args.workers == 1:
        asyncio.run(serve(args))
    else:
        worker = ["--pin-dir", args.pin_dir, "--filters", args.filters, "--port", str(args.port),
                  "--events", args.events, "--access-log", args.access_log, *(["--debug"] if args.debug else [])]
        asyncio.run(_serve_with_workers(args, worker))
