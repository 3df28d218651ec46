"""The proxy's listener: accepts redirected connections, finds their Flow and hands each to the
protocol handler (http, kafka). Imports plugin.proxy and the standard library only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence

from plugin.proxy.flows import Address, Connector, Emit, Flow, FlowSource, Limits
from plugin.proxy.http import handle_http

log = logging.getLogger(__name__)

IP_TRANSPARENT = 19  # <linux/in.h>: accept connections for addresses that are not local
IPV6_TRANSPARENT = 75  # <linux/in6.h>
SO_MARK = 36  # <asm-generic/socket.h>: skb->mark of the upstream packets (needs CAP_NET_ADMIN)
READ_LIMIT = 1 << 18  # StreamReader buffer: reads pause above twice this


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def transparent_listener(host: str, port: int, backlog: int = 1024, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket with IP_TRANSPARENT (IPV6_TRANSPARENT) set before bind, so that the
    datapath's bpf_sk_assign can hand it connections to any address (needs CAP_NET_ADMIN). With
    `reuseport`, every worker binds its own on the same port and the kernel spreads the connections
    assigned to the group (bpf_sk_assign picks within a reuseport group since Linux 6.5)."""
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def marked_connector(timeout: float = 10.0) -> Connector:
    """The production Connector: a TCP connection to flow.original, SO_MARK = flow.mark (set before
    connect, skipped when 0) and TCP_NODELAY, connected without blocking the loop."""

    async def connect(flow: Flow) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        host, port = flow.original
        sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            if flow.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, flow.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
        except BaseException:
            sock.close()
            raise

    return connect


def _addr(raw: object) -> Address:
    assert isinstance(raw, tuple)
    return str(raw[0]), int(raw[1])


class ProxyServer:
    """Serves redirected connections until close(). Give it `host`/`port` (a plain listener, port 0
    picks one) or already bound listening `sockets` (production: transparent_listener on 127.0.0.1
    and ::1); `connect` None means marked_connector(). `accept_direct` lets tests connect straight
    to the listener: the fake FlowSource then supplies the original destination (production refuses
    such connections: the proxy port is not a destination of its own)."""

    def __init__(self, source: FlowSource, connect: Connector | None, emit: Emit, limits: Limits | None = None, *,
                 host: str | None = None, port: int = 0, sockets: Sequence[socket.socket] = (),
                 accept_direct: bool = False) -> None:
        if host is None and not sockets:
            raise ValueError("ProxyServer needs host/port or listening sockets")
        self.source = source
        self.emit = emit
        self.connect = connect or marked_connector()
        self.limits = limits or Limits()
        self.accept_direct = accept_direct
        self._host, self._port = host, port
        self._sockets = list(sockets)
        self._servers: list[asyncio.Server] = []
        self._own: set[Address] = set()
        self._wild_ports: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted since start (monotonic)

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    @property
    def addresses(self) -> list[Address]:
        return sorted(self._own)

    async def start(self) -> None:
        if self._host is not None:
            sock = socket.socket(_family(self._host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(1024)
            sock.setblocking(False)
            self._sockets.append(sock)
        for sock in self._sockets:
            host, port = _addr(sock.getsockname())
            self._own.add((host, port))
            if ipaddress.ip_address(host).is_unspecified:
                self._wild_ports.add(port)
            self._servers.append(await asyncio.start_server(self._on_connection, sock=sock, limit=READ_LIMIT))
        log.info("L7 proxy listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self) -> None:
        """Stop listening, end every live connection and wait for their handlers to finish."""
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        log.info("L7 proxy closed")

    def _is_own(self, addr: Address) -> bool:
        return addr in self._own or addr[1] in self._wild_ports

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # one connection's failure must never reach the others
            log.exception("L7 proxy: connection from %s failed", writer.get_extra_info("peername"))
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # asyncio skips it when the listener was made without IPPROTO_TCP
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _addr(writer.get_extra_info("peername"))
        original = _addr(writer.get_extra_info("sockname"))
        if not self.accept_direct and self._is_own(original):
            log.debug("L7 proxy: %s:%d connected to the proxy port directly, closing", *client)
            return
        flow = self.source.lookup(client, original)
        if flow is None:
            log.debug("L7 proxy: no flow for %s:%d -> %s:%d, closing", *client, *original)
            return
        if self._is_own(flow.original):
            log.warning("L7 proxy: flow %s:%d -> %s:%d points at the proxy itself, closing", *client,
                        *flow.original)
            return
        kind = flow.kind
        if kind == "http":
            await handle_http(reader, writer, flow, self.source, self.connect, self.emit, self.limits)
        elif kind == "kafka":
            from plugin.proxy.kafka import handle_kafka  # kafka-python's schemas: loaded after the start (main.py)

            await handle_kafka(reader, writer, flow, self.source, self.connect, self.emit, self.limits)
        else:
            log.warning("L7 proxy: no handler for %r flows, closing %s:%d", kind, *client)

