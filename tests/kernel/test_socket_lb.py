"""The socket-level load balancer (bpf/cg_sock.c on the cgroup2 root) driven through the plan:
connect(), sendto()/recvmsg() and getpeername() through a VIP between namespaces of this module.

Services, served namespaces and the programs are built as the agent builds them
(plan.desired_state with a cgroup, plan.service_objects) and converged on a private instance.
Only the namespaces made here are served, so no other socket on the machine is translated.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import secrets
import select
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from datapath import plan
from datapath.kernel import bpfsys
from datapath.kernel.cgroup import detach_pinned, find_cgroup2
from datapath.kernel.netns import netns_cookie
from datapath.model import Endpoint
from datapath.plan import LbService, ServedNetns, SockPrograms
from datapath.services import PROTOCOLS, Backend, Frontend
from tests.kernel.test_restart import restarted_agent

from .conftest import Guest, Instance, guest_factory
from .helpers import PYTHON, in_ns, prog_id, run

pytestmark = pytest.mark.kernel

TCP, UDP = PROTOCOLS["tcp"], PROTOCOLS["udp"]
BACKEND_PORT = 8080  # every backend serves TCP and UDP here; the VIPs use other ports
VIP_PORT = 80
NETNS_DIR = "/var/run/netns"

# A backend: answers each TCP connection, and each UDP datagram, with "<name> <client address>"
# (the datagram's payload appended), so the client learns who answered and what address it saw.
_NAMED_SERVER = r"""
import socket, sys, threading
name, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((address, port))
tcp.listen(128)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((address, port))

def serve_tcp():
    while True:
        conn, peer = tcp.accept()
        with conn:
            conn.sendall(("%s %s\n" % (name, peer[0])).encode())

def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(("%s %s " % (name, peer[0])).encode() + data, peer)

threading.Thread(target=serve_tcp, daemon=True).start()
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # serves until the test closes stdin
"""

# `count` TCP connections in a row: who answered, getpeername(), or the error and how long it took.
_TCP_CLIENT = r"""
import json, socket, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((dst, port))
        peer = s.getpeername()
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        name, seen_from = data.decode().split()
        out.append({"name": name, "seen_from": seen_from, "peer": list(peer)})
    except OSError as exc:
        out.append({"error": type(exc).__name__, "errno": exc.errno, "seconds": time.monotonic() - start})
    finally:
        s.close()
print(json.dumps(out))
"""

# `sockets` unconnected UDP sockets, each sending `per_socket` datagrams with sendto() and reading
# each answer with recvmsg(): who answered, what it echoed, and the source address recvmsg() gave.
_UDP_CLIENT = r"""
import json, socket, sys, time
dst, port, sockets, per_socket = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = []
for i in range(sockets):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    replies = []
    start = time.monotonic()
    try:
        for j in range(per_socket):
            sent = "cg%d.%d" % (i, j)
            s.sendto(sent.encode(), (dst, port))
            data, _, _, source = s.recvmsg(2048)
            name, seen_from, echo = data.decode().split(" ", 2)
            replies.append({"name": name, "seen_from": seen_from, "echo": echo, "sent": sent,
                            "source": list(source)})
        out.append({"replies": replies})
    except OSError as exc:
        out.append({"replies": replies, "error": type(exc).__name__, "errno": exc.errno,
                    "seconds": time.monotonic() - start})
    finally:
        s.close()
print(json.dumps(out))
"""


# -- the module's world ---------------------------------------------------------------------


def free_vip_range() -> ipaddress.IPv4Network:
    """A /24 of 10.96.0.0/12 that no route of the host touches."""
    taken = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]")
        if r.get("dst", "default") != "default"
    ]
    pool = list(ipaddress.IPv4Network("10.96.0.0/12").subnets(new_prefix=24))
    for _ in range(200):
        net = pool[secrets.randbelow(len(pool))]
        if not any(net.overlaps(t) for t in taken):
            return net
    raise AssertionError("no free /24 in 10.96.0.0/12 for the VIPs")


def sock_attachments(cgroup: str) -> dict[int, str]:
    """Program id -> attach type of every program attached to `cgroup` (bpftool; "\\n" = none)."""
    out = run("bpftool", "-j", "cgroup", "show", cgroup).stdout
    return {int(p["id"]): str(p["attach_type"]) for p in json.loads(out.strip() or "[]")}


class NamedServer:
    """_NAMED_SERVER in a guest's namespace, on its address and BACKEND_PORT."""

    def __init__(self, guest: Guest, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", guest.ns, PYTHON, "-c", _NAMED_SERVER, name, str(guest.ip4), str(BACKEND_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.close()
            raise AssertionError(f"backend {name} did not start: {line!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@dataclass
class Lab:
    """A private instance with its socket programs on the cgroup2 root; one served client, one
    client in a namespace nobody serves, three named backends; the VIPs are `vips`."""

    inst: Instance
    cgroup: str
    vips: ipaddress.IPv4Network
    client: Guest
    outsider: Guest
    backends: list[Guest]
    names: dict[str, Guest]  # backend name -> its guest
    served_ep: Endpoint  # the client's endpoint with its real sandbox path
    prog_ids: set[int] = field(default_factory=set)  # every socket program this module attached
    _hosts: Iterator[int] = field(default_factory=lambda: iter(range(1, 255)))

    @property
    def settings(self) -> plan.Settings:
        return replace(self.inst.settings(), cgroup=self.cgroup)

    def vip(self) -> ipaddress.IPv4Address:
        return self.vips[next(self._hosts)]

    def backend(self, name: str) -> Backend:
        return Backend(self.names[name].ip4, BACKEND_PORT)

    def lb_scope(self) -> set[plan.Key]:
        """The keys of the socket balancer the agent's desired state holds for the client: the
        programs and the client's namespace. The host's (ServedNetns(0)) is left out on purpose."""
        return {
            SockPrograms(self.cgroup, self.inst.dp.revision).key,
            ServedNetns(self.served_ep.sandbox_hash).key,
        }

    def attach(self) -> plan.Plan:
        desired = plan.desired_state([self.inst.network], [self.served_ep], self.settings)
        # The ids first: a program attached by a converge that then fails is still swept by id.
        self.prog_ids |= {prog_id(fn.fd) for fn, _ in self.inst.dp.sock_programs.values()}
        return self.inst.converge(desired, self.lb_scope())

    def ours_attached(self) -> dict[int, str]:
        return {i: t for i, t in sock_attachments(self.cgroup).items() if i in self.prog_ids}


def served(guest: Guest) -> Endpoint:
    """The guest's endpoint with its sandbox where its namespace really is (the guest factory
    names the namespace after the endpoint, not after the sandbox it was given)."""
    return replace(guest.ep, sandbox=f"{NETNS_DIR}/{guest.ns}")


def tcp_connects(guest: Guest, dst: Any, port: int, count: int) -> list[dict[str, Any]]:
    out = in_ns(guest.ns, PYTHON, "-c", _TCP_CLIENT, str(dst), str(port), str(count), timeout=30).stdout
    return list(json.loads(out))


def udp_exchanges(guest: Guest, dst: Any, port: int, sockets: int, per_socket: int) -> list[dict[str, Any]]:
    out = in_ns(
        guest.ns, PYTHON, "-c", _UDP_CLIENT, str(dst), str(port), str(sockets), str(per_socket), timeout=30
    ).stdout
    return list(json.loads(out))


def refused_at_once(result: dict[str, Any], code: int) -> bool:
    """The attempt failed with `code` without waiting (the client's timeout is 3 s)."""
    return result.get("errno") == code and result["seconds"] < 1.0


@pytest.fixture(scope="module")
def cgroup() -> str:
    found = find_cgroup2()
    if not found:
        pytest.skip("no cgroup2 mount: the socket programs have nowhere to attach")
    return found


@pytest.fixture(scope="module")
def vips() -> Iterator[ipaddress.IPv4Network]:
    """A VIP /24 routed to a blackhole on the host (each namespace gets its own in `lab`)."""
    net = free_vip_range()
    run("ip", "route", "add", "blackhole", str(net))
    try:
        yield net
    finally:
        run("ip", "route", "del", "blackhole", str(net), check=False)


@pytest.fixture(scope="module")
def lab(instances: Callable[[str], Instance], cgroup: str, vips: ipaddress.IPv4Network) -> Iterator[Lab]:
    inst = instances("s").ensure_network()  # private: observe() sees what this module built
    with guest_factory(inst) as make, contextlib.ExitStack() as stack:
        client, outsider, *backends = (make(ipv6=False) for _ in range(5))
        for guest in (client, outsider, *backends):  # before any traffic
            run("ip", "-n", guest.ns, "route", "add", "blackhole", str(vips))
        names = {}
        for i, guest in enumerate(backends):
            name = f"cgb{i}{guest.ns[-6:]}"
            stack.enter_context(contextlib.closing(NamedServer(guest, name)))
            names[name] = guest
        lab = Lab(inst, cgroup, vips, client, outsider, backends, names, served(client))
        stack.callback(_detach_everything, lab)  # runs before the servers stop and the guests go
        lab.attach()
        yield lab


def _detach_everything(lab: Lab) -> None:
    """Detach through the plan, then unpin what is left; any program of ours still on the cgroup
    root after that is detached by id and fails the module."""
    try:
        lab.inst.converge(set(), lab.lb_scope())
    finally:
        detach_pinned(lab.inst.pin_dir, lab.cgroup)
        left = lab.ours_attached()
        for pid, attach_type in left.items():
            run("bpftool", "cgroup", "detach", lab.cgroup, attach_type, "id", str(pid), check=False)
        assert not lab.ours_attached(), "socket programs still attached after the sweep"
        assert not left, f"socket programs left attached to {lab.cgroup} after detaching: {left}"


class Services:
    """The services of one test, converged as the agent converges them (plan.service_objects)
    and all removed afterwards."""

    _rev_nats = iter(range(1, 65536))

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.specs: dict[Frontend, tuple[int, tuple[Backend, ...]]] = {}
        self.scope: set[plan.Key] = set()

    def put(self, frontend: Frontend, backends: tuple[Backend, ...]) -> plan.Plan:
        rev_nat = self.specs[frontend][0] if frontend in self.specs else next(self._rev_nats)
        self.specs[frontend] = (rev_nat, backends)
        return self.converge()

    def rev_nat(self, frontend: Frontend) -> int:
        return self.specs[frontend][0]

    def converge(self) -> plan.Plan:
        desired = plan.service_objects(((fe, rev, bes) for fe, (rev, bes) in self.specs.items()), self.lab.inst.name)
        self.scope |= plan.keys(desired)
        return self.lab.inst.converge(desired, self.scope)

    def close(self) -> None:
        self.specs.clear()
        self.converge()


@pytest.fixture
def services(lab: Lab) -> Iterator[Services]:
    made = Services(lab)
    try:
        yield made
    finally:
        made.close()


def map_dump(lab: Lab, name: str) -> list[tuple[bytes, bytes]]:
    """(key, value) bytes of every entry of one of the instance's pinned maps, read by bpftool."""
    out = run("bpftool", "-j", "map", "dump", "pinned", str(lab.inst.pin_dir / name)).stdout
    return [
        (bytes(int(b, 16) for b in e["key"]), bytes(int(b, 16) for b in e["value"]))
        for e in json.loads(out.strip() or "[]")
    ]


def service_entries(lab: Lab, fe: Frontend, rev_nat: int) -> tuple[dict[int, bytes], bytes | None]:
    """A service's cg_lb_services entries (slot -> key+value bytes) and its cg_lb_revnat value."""
    prefix = fe.address.packed.ljust(16, b"\0") + struct.pack("!HBB", fe.port, fe.proto, fe.address.version)
    slots = {
        struct.unpack_from("=H", k, 20)[0]: k + v for k, v in map_dump(lab, "cg_lb_services") if k.startswith(prefix)
    }
    revnat = next((v for k, v in map_dump(lab, "cg_lb_revnat") if k == struct.pack("=I", rev_nat)), None)
    return slots, revnat


# -- tests ----------------------------------------------------------------------------------


def test_connect_to_a_vip_is_balanced_over_every_backend_and_the_peer_reads_as_the_vip(
    lab: Lab, services: Services
) -> None:
    fe = Frontend(lab.vip(), VIP_PORT, TCP)
    services.put(fe, tuple(lab.backend(n) for n in lab.names))

    results = tcp_connects(lab.client, fe.address, fe.port, 60)

    assert all("name" in r for r in results), [r for r in results if "name" not in r]
    assert {r["name"] for r in results} == set(lab.names)  # 60 connections met all three
    assert {tuple(r["peer"]) for r in results} == {(str(fe.address), fe.port)}  # getpeername(): the VIP
    assert {r["seen_from"] for r in results} == {str(lab.client.ip4)}  # the backend saw the client itself


def test_a_namespace_nobody_serves_is_not_translated(lab: Lab, services: Services) -> None:
    fe = Frontend(lab.vip(), VIP_PORT, TCP)
    services.put(fe, tuple(lab.backend(n) for n in lab.names))
    udp = Frontend(fe.address, VIP_PORT, UDP)
    services.put(udp, tuple(lab.backend(n) for n in lab.names))
    cookies = {int(k.value) for k in lab.inst.dp.lb_netns}
    assert netns_cookie(lab.served_ep.sandbox) in cookies
    assert netns_cookie(f"{NETNS_DIR}/{lab.outsider.ns}") not in cookies

    outside = tcp_connects(lab.outsider, fe.address, fe.port, 3)
    outside_udp = udp_exchanges(lab.outsider, udp.address, udp.port, 1, 1)
    inside = tcp_connects(lab.client, fe.address, fe.port, 3)

    # Its blackhole route answers connect() and sendto() at once: the VIP was left as it was.
    assert all(refused_at_once(r, errno.EINVAL) for r in outside), outside
    assert refused_at_once(outside_udp[0], errno.EINVAL) and not outside_udp[0]["replies"], outside_udp
    assert all(r.get("name") in lab.names for r in inside), inside  # the same VIP, served: balanced


def test_a_service_without_backends_refuses_connect_and_sendto(lab: Lab, services: Services) -> None:
    tcp = Frontend(lab.vip(), VIP_PORT, TCP)
    udp = Frontend(tcp.address, VIP_PORT, UDP)
    services.put(tcp, ())
    services.put(udp, ())
    observed = lab.inst.kernel.observe({LbService(tcp, 0).key})
    assert observed == {LbService(tcp, services.rev_nat(tcp), ())}

    tcp_results = tcp_connects(lab.client, tcp.address, tcp.port, 3)
    udp_results = udp_exchanges(lab.client, udp.address, udp.port, 2, 1)

    assert all(refused_at_once(r, errno.ECONNREFUSED) for r in tcp_results), tcp_results
    assert all(refused_at_once(r, errno.ECONNREFUSED) and not r["replies"] for r in udp_results), udp_results


def test_udp_sendto_a_vip_reaches_the_backends_and_replies_read_as_from_the_vip(lab: Lab, services: Services) -> None:
    fe = Frontend(lab.vip(), 53, UDP)
    services.put(fe, tuple(lab.backend(n) for n in lab.names))

    results = udp_exchanges(lab.client, fe.address, fe.port, 40, 3)

    assert all("error" not in r and len(r["replies"]) == 3 for r in results), [r for r in results if "error" in r]
    replies = [reply for r in results for reply in r["replies"]]
    assert all(reply["echo"] == reply["sent"] for reply in replies)  # each datagram reached a backend
    assert {reply["seen_from"] for reply in replies} == {str(lab.client.ip4)}
    assert {tuple(reply["source"]) for reply in replies} == {(str(fe.address), fe.port)}  # recvmsg(): the VIP
    # A socket keeps the backend it was given; the sockets together meet every backend.
    assert all(len({reply["name"] for reply in r["replies"]}) == 1 for r in results), results
    assert {reply["name"] for reply in replies} == set(lab.names)


def test_updating_a_service_leaves_another_untouched_and_new_connections_follow_at_once(
    lab: Lab, services: Services
) -> None:
    first, second, third = lab.names
    a = Frontend(lab.vip(), VIP_PORT, TCP)
    b = Frontend(lab.vip(), VIP_PORT, TCP)
    services.put(a, (lab.backend(first), lab.backend(second), lab.backend(third)))
    services.put(b, (lab.backend(third), lab.backend(first), lab.backend(second)))
    b_before = service_entries(lab, b, services.rev_nat(b))
    assert sorted(b_before[0]) == [0, 1, 2, 3] and b_before[1] is not None

    services.put(a, (lab.backend(first), lab.backend(third)))  # the middle one leaves
    after_removal = tcp_connects(lab.client, a.address, a.port, 30)
    a_slots = sorted(service_entries(lab, a, services.rev_nat(a))[0])
    a_observed = lab.inst.kernel.observe({LbService(a, 0).key})
    b_after_removal = service_entries(lab, b, services.rev_nat(b))

    services.put(a, (lab.backend(second),))  # and then another set altogether
    after_change = tcp_connects(lab.client, a.address, a.port, 10)
    b_after_change = service_entries(lab, b, services.rev_nat(b))
    again = services.converge()

    assert b_after_removal == b_before and b_after_change == b_before  # byte for byte
    assert a_slots == [0, 1, 2]  # the dropped slot is gone
    assert a_observed == {LbService(a, services.rev_nat(a), (lab.backend(first), lab.backend(third)))}
    assert [r for r in after_removal if "name" not in r] == []
    assert {r["name"] for r in after_removal} == {first, third}
    assert {r.get("name") for r in after_change} == {second}
    assert not again, again.describe()  # converging its own result plans nothing
    assert {r.get("name") for r in tcp_connects(lab.client, b.address, b.port, 30)} == set(lab.names)


def another_agent(inst: Instance, revision: str) -> contextlib.AbstractContextManager[tuple[Any, Any]]:
    """What an upgraded agent would load on the instance's pin dir: new programs, the same maps."""
    return restarted_agent(inst, revision)


def test_a_new_revision_is_attached_before_the_old_is_detached_and_outlives_its_agent(
    lab: Lab, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    only = next(iter(lab.names))
    fe = Frontend(lab.vip(), VIP_PORT, TCP)
    services.put(fe, (lab.backend(only),))
    old_rev = lab.inst.dp.revision
    old = {prog_id(fn.fd): name for name, (fn, _) in lab.inst.dp.sock_programs.items()}
    assert set(old) <= set(lab.ours_attached())
    new_rev = secrets.token_hex(8)
    at_detach: list[tuple[str, int, dict[int, str]]] = []  # (program, new id, what the cgroup held)

    with another_agent(lab.inst, new_rev) as (dp, kernel):
        new = {name: prog_id(fn.fd) for name, (fn, _) in dp.sock_programs.items()}
        lab.prog_ids |= set(new.values())
        desired = plan.desired_state([], [], replace(lab.settings, program_revision=new_rev))
        scope = {SockPrograms(lab.cgroup, new_rev).key}
        change = plan.diff({o for o in desired if o.key in scope}, kernel.observe(scope), scope)
        real_detach = bpfsys.prog_detach

        def detach_and_record(cgroup_fd: int, fd: int, attach_type: int) -> None:
            name = old[prog_id(fd)]
            at_detach.append((name, new[name], sock_attachments(lab.cgroup)))
            real_detach(cgroup_fd, fd, attach_type)

        with monkeypatch.context() as patch:
            patch.setattr(bpfsys, "prog_detach", detach_and_record)
            kernel.apply(change)
    # The second agent is gone, its Python objects and file descriptors with it.
    attached = lab.ours_attached()
    pins = sorted(os.listdir(lab.inst.pin_dir / "progs"))
    still_balanced = tcp_connects(lab.client, fe.address, fe.port, 3)

    gone = detach_pinned(lab.inst.pin_dir, lab.cgroup)
    after_detach = lab.ours_attached()
    pins_left = (lab.inst.pin_dir / "progs").exists()
    untranslated = tcp_connects(lab.client, fe.address, fe.port, 1)
    lab.attach()  # back to the module's own revision

    assert change.change == ((SockPrograms(lab.cgroup, old_rev), SockPrograms(lab.cgroup, new_rev)),)
    assert sorted(name for name, _, _ in at_detach) == sorted(new)  # each old program was detached...
    for name, new_id, held in at_detach:  # ...while both it and its successor were attached
        old_id = next(i for i, n in old.items() if n == name)
        assert {old_id, new_id} <= set(held), (name, held)
    assert set(attached) == set(new.values())  # only the new revision, still there without its agent
    assert pins == sorted(f"{name}@{new_rev}" for name in new)
    assert {r.get("name") for r in still_balanced} == {only}
    assert gone == sorted(new)
    assert after_detach == {}
    assert not pins_left
    assert refused_at_once(untranslated[0], errno.EINVAL), untranslated  # the blackhole: nothing translates
    assert set(old) <= set(lab.ours_attached())
