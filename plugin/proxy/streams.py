"""What the proxy's HTTP/1.1 and HTTP/2 relays share: read and drain with deadlines, closing a
stream quietly, and Cilium's denial body. Imports asyncio only."""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 65536  # bytes per read
HIGH_WATER = 1 << 20  # await drain only when this much is queued for a peer
DENIED_BODY = b"Access denied\r\n"  # Cilium's Envoy: "Access denied" + CRLF, content-length 15


class Gone(Exception):
    """The client or upstream went away, or a timeout ended the connection: stop quietly."""


async def close_stream(writer: asyncio.StreamWriter | None, wait: float = 1.0) -> None:
    """Close a stream without raising; abort it if its buffer does not flush within `wait`."""
    if writer is None:
        return
    with contextlib.suppress(Exception):
        writer.close()
        async with asyncio.timeout(wait):
            await writer.wait_closed()
    if not writer.transport.is_closing() or writer.transport.get_write_buffer_size():
        writer.transport.abort()


async def read_some(reader: asyncio.StreamReader, deadline: float) -> bytes:
    """Up to CHUNK bytes (b"" at EOF) before `deadline` (loop time), else Gone."""
    try:
        async with asyncio.timeout_at(deadline):
            return await reader.read(CHUNK)
    except TimeoutError:
        raise Gone("timeout") from None


async def drain(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Wait for `writer`'s buffer to drain; Gone if the peer reads nothing for `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
    except TimeoutError:
        raise Gone("peer not reading") from None
