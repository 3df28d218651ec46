"""Helpers for the kernel tier: commands in network namespaces, raw frames, polling, probes.

Standard library only (plus datapath.events). Frames are built by hand and sent with
AF_PACKET from inside a namespace, so the tier needs no packet-crafting dependency.
TCP servers, clients and probe loops are small Python scripts run in a namespace.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from datapath import events, reasons

T = TypeVar("T")
VERDICT = {constant: code for code, (constant, _text) in reasons.VERDICTS.items()}  # "DROP_INVALID_SIP" -> 132
PYTHON = sys.executable
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD


# -- waiting ------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.01)  # poll interval, not a synchronisation point


# -- commands -----------------------------------------------------------------------------


def run(
    *args: str, check: bool = True, timeout: float = 15.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_ns(ns: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *args, **kwargs)


def link_names() -> set[str]:
    out = run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def netns_names() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return run("ip", "link", "show", "dev", name, check=False).returncode == 0


def ping(ns: str | None, dst: Any, count: int = 1, timeout: float = 2.0) -> str:
    """Ping from `ns` (None: the host) and return ping's output; fails the test on loss."""
    args = ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", str(timeout), str(dst)]
    proc = in_ns(ns, *args, check=False) if ns else run(*args, check=False)
    assert proc.returncode == 0, f"ping {dst} from {ns or 'host'} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def ping_fails(ns: str | None, dst: Any, wait: float = 0.5) -> bool:
    """One echo from `ns` (None: the host) that gets no answer within `wait` seconds."""
    args = ["ping", "-n", "-c", "1", "-W", str(wait), str(dst)]
    proc = in_ns(ns, *args, check=False) if ns else run(*args, check=False)
    return proc.returncode != 0


def ttls(ping_output: str) -> set[int]:
    return {int(t) for t in re.findall(r"ttl=(\d+)", ping_output)}


def neighbours(ns: str) -> dict[str, str]:
    """Neighbour table of `ns` as address -> lladdr (resolved entries only)."""
    out = in_ns(ns, "ip", "neigh", "show").stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if "lladdr" in parts:
            table[str(ipaddress.ip_address(parts[0]))] = parts[parts.index("lladdr") + 1]
    return table


# -- frames -------------------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst_mac: str, src_mac: str, ethertype: int, payload: bytes) -> bytes:
    frame = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0")


def ipv6_frame(
    src_mac: str,
    dst_mac: str,
    src: Any,
    dst: Any,
    next_header: int,
    payload: bytes,
    hop_limit: int = 64,
    csum_at: int | None = None,
) -> bytes:
    """IPv6 with `payload` as the upper layer; `csum_at` is where its checksum goes, if it has one."""
    src, dst = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    if csum_at is not None:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(payload), next_header)
        csum = _csum(pseudo + payload) or 0xFFFF
        payload = payload[:csum_at] + struct.pack("!H", csum) + payload[csum_at + 2 :]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, src.packed, dst.packed)
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, header + payload)


def ipv4_packet(src: Any, dst: Any, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    """An IPv4 header (DF, checksum filled in) followed by `payload`."""
    src, dst = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0x4000, ttl, proto, 0, src.packed, dst.packed
    )
    return header[:10] + struct.pack("!H", _csum(header)) + header[12:] + payload


def udp_frame(src_mac: str, dst_mac: str, src: Any, dst: Any, dport: int, payload: bytes, sport: int = 40000) -> bytes:
    """An Ethernet frame carrying a UDP datagram over IPv4 or IPv6, checksums filled in."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if src.version == 6:
        return ipv6_frame(src_mac, dst_mac, src, dst, 17, udp, csum_at=6)
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4_packet(src, dst, 17, udp))


def icmp4_error_frame(
    src_mac: str, dst_mac: str, src: Any, dst: Any, icmp_type: int, code: int, quoted: bytes
) -> bytes:
    """An ICMPv4 error (e.g. type 3 code 3, port unreachable) quoting the packet `quoted`."""
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4_packet(src, dst, 1, body))


def arp_frame(src_mac: str, dst_mac: str, op: int, sha: str, sip: Any, tha: str, tip: Any) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        op,
        mac_bytes(sha),
        ipaddress.IPv4Address(sip).packed,
        mac_bytes(tha),
        ipaddress.IPv4Address(tip).packed,
    )
    return ethernet(dst_mac, src_mac, ETH_P_ARP, body)


_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


def _await_ready(proc: subprocess.Popen[str], close: Callable[[], None], what: str) -> None:
    """Wait (10 s at most) for the helper process to print its "ready" line."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        close()
        raise AssertionError(f"{what} did not start: {line!r}")


def send_frames(ns: str, *frames: bytes, ifname: str = "eth0") -> None:
    """Write raw frames onto `ifname` inside `ns`, as a root process in a container could."""
    in_ns(ns, PYTHON, "-c", _SEND, ifname, *(f.hex() for f in frames))


_CAPTURE = """
import select, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
stop, watch = sys.argv[2].encode(), [m.encode() for m in sys.argv[3:]]
print("ready", flush=True)
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    if not select.select([s], [], [], 0.2)[0]:
        continue
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    for m in watch:
        if m in frame:
            print("seen", m.decode(), flush=True)
    if stop in frame:
        print("stop", flush=True)
        break
"""


class Capture:
    """Frames arriving on eth0 in `ns`: which watched markers showed up before the stop marker.

    Send the suspicious frames first, then a legitimate frame carrying `stop`: the
    capture ends when that one arrives, so it bounds the wait without a sleep.
    """

    def __init__(self, ns: str, stop: str, watch: Iterable[str]) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PYTHON, "-c", _CAPTURE, "eth0", stop, *watch],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _await_ready(self.proc, self.close, f"packet capture in {ns}")

    def result(self, timeout: float = 10.0) -> tuple[set[str], bool]:
        """(markers seen, whether the stop marker arrived)."""
        out, _ = self.proc.communicate(timeout=timeout)
        lines = out.splitlines()
        return {line.split(" ", 1)[1] for line in lines if line.startswith("seen ")}, "stop" in lines

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- datapath events ----------------------------------------------------------------------


class EventLog:
    """Decoded drop events from one Datapath's ring buffer, kept for the whole run."""

    def __init__(self, datapath: Any) -> None:
        self.dp = datapath
        self.seen: list[dict[str, Any]] = []

    def _sink(self, raw: bytes) -> None:
        self.seen.append(events.decode(raw))

    def mark(self) -> int:
        """Drain what is queued now; events after the returned index are newer."""
        self.dp.poll_events(self._sink, 0)
        return len(self.seen)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], since: int = 0, timeout: float = 5.0, what: str = "event"
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            self.dp.poll_events(self._sink, 50)
            return next((e for e in self.seen[since:] if predicate(e)), None)

        return wait_until(find, timeout, what)

    def since(self, index: int) -> list[dict[str, Any]]:
        self.dp.poll_events(self._sink, 0)
        return self.seen[index:]


def counter_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], code: int) -> tuple[int, int]:
    old, new = before.get(code, (0, 0)), after.get(code, (0, 0))
    return new[0] - old[0], new[1] - old[1]


# -- probes -------------------------------------------------------------------------------


class _Logged:
    """A background command in a namespace whose output goes to a temporary file."""

    def __init__(self, cmd: list[str], prefix: str) -> None:
        self._out = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".txt")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self._out.name).read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()

    def __enter__(self) -> _Logged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PingProbe(_Logged):
    """A fast background ping whose replies are counted by sequence number.

    Loss shows up as a gap in the replied sequence numbers, so stopping the probe with
    SIGINT while one echo is still in flight does not count as a lost probe.
    """

    def __init__(self, ns: str, dst: Any, interval: float = 0.01) -> None:
        super().__init__(["ip", "netns", "exec", ns, "ping", "-n", "-i", str(interval), "-W", "1", str(dst)],
                         "cgprobe")

    def replies(self) -> list[int]:
        return sorted({int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", self.output())})

    def wait_replies(self, count: int, timeout: float = 5.0) -> None:
        wait_until(lambda: len(self.replies()) >= count, timeout, f"{count} ping replies")

    def stop(self) -> list[int]:
        """Stop the probe; the sequence numbers that were never answered (excluding one in flight)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=5)
        got = self.replies()
        return sorted(set(range(1, max(got, default=0) + 1)) - set(got))


class TcMonitor:
    """tc notifications (qdisc and filter added, replaced, deleted) from the moment it is made.

    A plain rtnetlink socket subscribed to RTMGRP_TC. The kernel queues a notification
    before it acknowledges the change, so once an apply() has returned, draining the
    socket yields every tc change that apply made.
    """

    NAMES = {36: "RTM_NEWQDISC", 37: "RTM_DELQDISC", 44: "RTM_NEWTFILTER", 45: "RTM_DELTFILTER"}
    RTMGRP_TC = 0x8

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, self.RTMGRP_TC))
        self.sock.setblocking(False)

    def drain(self, ifindexes: Iterable[int]) -> list[str]:
        """Notifications seen so far for these interfaces, in order (RTM_NEWTFILTER, RTM_DELQDISC, ...)."""
        wanted, out = set(ifindexes), []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            offset = 0
            while offset + 24 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                ifindex = struct.unpack_from("=i", data, offset + 16 + 4)[0]  # nlmsghdr, then tcmsg
                if kind in self.NAMES and ifindex in wanted:
                    out.append(self.NAMES[kind])
                offset += (length + 3) & ~3 if length else len(data)

    def close(self) -> None:
        self.sock.close()


def prog_id(fd: int) -> int:
    """Kernel id of the BPF program behind one of our file descriptors."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("prog_id:"):
            return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a BPF program")


def attached_prog_ids(dev: str, direction: str) -> list[int]:
    """Ids of the BPF programs in the tc filters of `dev` (`ingress` or `egress`)."""
    out = run("tc", "filter", "show", "dev", dev, direction).stdout
    return [int(i) for i in re.findall(r"\bid (\d+)", out)]


# -- TCP servers, clients and probe loops in a namespace -------------------------------------

_SERVE = """
import socket, sys, threading
addresses, ports = sys.argv[1].split(","), [int(p) for p in sys.argv[2:]]

def handle(conn, port):
    with conn:
        conn.settimeout(30)
        try:
            conn.sendall(b"cg %d\\n" % port)
            for line in conn.makefile("rb"):
                conn.sendall(b"echo " + line)
        except OSError:
            pass

def serve(sock, port):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()

for address in addresses:
    for port in ports:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        threading.Thread(target=serve, args=(sock, port), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # serves until the test closes stdin
"""


class TcpServer:
    """Accepts on every (address, port) in `ns`; greets with `cg <port>` and echoes lines back."""

    def __init__(self, ns: str, addresses: Iterable[Any], ports: Iterable[int]) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                PYTHON,
                "-c",
                _SERVE,
                ",".join(str(a) for a in addresses),
                *(str(p) for p in ports),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _await_ready(self.proc, self.close, f"TCP server in {ns}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TCP_TRY = """
import socket, sys
dst, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((dst, port), timeout=timeout) as s:
        s.sendall(b"hello\\n")
        data = b""
        while data.count(b"\\n") < 2:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    print("ok" if data == b"cg %d\\necho hello\\n" % port else "garbled %r" % data)
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print("error", exc)
"""


def tcp_try(ns: str, dst: Any, port: int, timeout: float) -> str:
    """One TCP exchange with a TcpServer from `ns`: "ok", "timeout", "refused" or an error."""
    return in_ns(ns, PYTHON, "-c", _TCP_TRY, str(dst), str(port), str(timeout), timeout=timeout + 10).stdout.strip()


_TCP_PROBE = """
import socket, sys, time
dst, port, interval, timeout, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), \\
    float(sys.argv[5])
end = time.monotonic() + limit
while time.monotonic() < end:
    start = time.monotonic()
    try:
        with socket.create_connection((dst, port), timeout=timeout) as s:
            ok = s.recv(64).startswith(b"cg ")
    except OSError:
        ok = False
    print("%.6f %.6f %s" % (start, time.monotonic(), "ok" if ok else "fail"), flush=True)
    time.sleep(max(0.0, start + interval - time.monotonic()))  # the probe's pace
"""


class TcpProbe(_Logged):
    """A loop of TCP connections to a TcpServer, one every `interval`, each logged with its
    start and end (CLOCK_MONOTONIC, comparable with time.monotonic() here) and outcome."""

    def __init__(
        self, ns: str, dst: Any, port: int, interval: float = 0.05, timeout: float = 0.2, limit: float = 60.0
    ) -> None:
        super().__init__(["ip", "netns", "exec", ns, PYTHON, "-c", _TCP_PROBE, str(dst), str(port), str(interval),
                          str(timeout), str(limit)], "cgtcpprobe")

    def results(self) -> list[tuple[float, float, bool]]:
        """(start, end, succeeded) of every finished attempt."""
        out = []
        for line in self.output().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] in ("ok", "fail"):
                out.append((float(parts[0]), float(parts[1]), parts[2] == "ok"))
        return out

    def wait(
        self,
        predicate: Callable[[list[tuple[float, float, bool]]], bool],
        timeout: float = 10.0,
        what: str = "probe results",
    ) -> list[tuple[float, float, bool]]:
        def check() -> list[tuple[float, float, bool]] | None:
            assert self.proc.poll() is None, f"probe exited early:\n{self.output()[-2000:]}"
            results = self.results()
            return results if predicate(results) else None

        return wait_until(check, timeout, what)

    def stop(self) -> list[tuple[float, float, bool]]:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        return self.results()


_STREAM = """
import socket, sys, time
dst, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((dst, port), timeout=3)
s.settimeout(0.5)
f = s.makefile("rb")
f.readline()
print("connected", s.getsockname()[1], flush=True)
end = time.monotonic() + 60
n = 0
while time.monotonic() < end:
    n += 1
    try:
        s.sendall(b"msg %d\\n" % n)
        line = f.readline()
    except OSError as exc:
        print("fail", n, exc, flush=True)
        break
    if line != b"echo msg %d\\n" % n:
        print("fail", n, repr(line), flush=True)
        break
    print("ok", n, flush=True)
    time.sleep(interval)  # the stream's pace
"""


class TcpStream(_Logged):
    """One long-lived TCP connection to a TcpServer exchanging a line every `interval`;
    it stops at the first exchange that fails."""

    def __init__(self, ns: str, dst: Any, port: int, interval: float = 0.05) -> None:
        super().__init__(["ip", "netns", "exec", ns, PYTHON, "-c", _STREAM, str(dst), str(port), str(interval)],
                         "cgstream")

    def sport(self) -> int:
        found = re.search(r"^connected (\d+)$", self.output(), re.M)
        assert found, f"the stream never connected:\n{self.output()}"
        return int(found.group(1))

    def exchanges(self) -> int:
        return len(re.findall(r"^ok \d+$", self.output(), re.M))

    def failed(self) -> str | None:
        found = re.search(r"^fail .*$", self.output(), re.M)
        return found.group(0) if found else None


_UDP_ASK = """
import socket, sys
dst, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.connect((dst, port))
s.send(b"cg-udp")
try:
    print("answer %r" % s.recv(100))
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""


def udp_ask(ns: str, dst: Any, port: int, timeout: float = 3.0) -> str:
    """Send one datagram from a connected UDP socket in `ns`: "refused" when an ICMP port
    unreachable comes back, "timeout" when nothing does."""
    return in_ns(ns, PYTHON, "-c", _UDP_ASK, str(dst), str(port), str(timeout), timeout=timeout + 10).stdout.strip()


def udp_send_from_host(dst: Any, port: int, payload: bytes) -> None:
    family = socket.AF_INET if ipaddress.ip_address(dst).version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(payload, (str(dst), port))


def is_root() -> bool:
    return os.geteuid() == 0
