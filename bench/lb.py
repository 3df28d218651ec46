"""LB tier (issue 13): socket-level load balancing against straight connections and against
kube-proxy's iptables DNAT; service create/update/delete → effective; 1k and 10k services loaded.

    python -m bench.lb [--run ID] [--quick]          (`make bench-lb`)

The rig is bench/datapath.py's (its Rig, containers and rr.c) on a private dockerd:

  cg_direct   a client container on a cellgate network → the server container's address
  cg_vip      the same client → a VIP whose one backend is that server (cgroup connect4 program)
  br_direct   a client container on the dockerd's default bridge (our cgb…br) → a server there
  ipt_N       the same bridge client → a VIP that iptables DNATs (to a second rr server in the
              same server container, so straight and DNATed connections never share a server
              tuple) in nat PREROUTING as kube-proxy does: a services chain of N
              `-d VIP -p tcp --dport P -j SVC` rules (the target last), SVC chains splitting over
              two SEP chains by `-m statistic --mode random`, SEP chains marking hairpin traffic
              and DNATing; N = 1, 1k, 10k

Three phases, each of interleaved rounds in a fresh shuffle: cellgate holding no other service,
1k services (made by REST one by one), 10k (9k more written as the agent's own service
documents, picked up by an agent restart: one by one over REST would take about 20 minutes,
see the result's `loading`). Ratios are paired within a round. Between the phases, create →
effective, update → effective and delete → effective are timed: a thread in the client
container's network namespace connects to the VIP in a loop while the REST call runs; two
listeners in the server container's namespace (a thread of this process) answer 'O' or 'N', so
the probe knows which backend it reached.

VIPs are in a /17 of 10.96.0.0/12 routed to a blackhole in the host and in the cellgate client's
namespace (a missed translation goes nowhere, and fails at once in the client): the lower half
for cellgate's services, the upper half for iptables'. Our nat chains (`CGB-<tag>-…`) are
jumped to from nat PREROUTING only for packets from our bridge (comment `cgbench:<tag>`), never
from OUTPUT, so that no other traffic of the host walks them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import ipaddress
import json
import logging
import os
import queue
import random
import selectors
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import rig
from bench.common import (
    Cleanup,
    Interrupted,
    log,
    machine,
    new_run_id,
    new_tag,
    run,
    run_dir,
    summary,
    timed,
    wait_until,
    write_raw,
)
from bench.datapath import Config, Rig, cpu_seconds

MODES = ("rr", "crr")
OLD_PORT, NEW_PORT = 5301, 5302  # the probe's backends: they answer b"O" and b"N"
DNAT_PORT = 5202  # a second rr server on the bridge server, the iptables target: DNATed and straight
# connections from the client never share a server tuple (a TIME_WAIT one left by the other kind
# has timestamps of another offset, so PAWS would drop the SYN and cost 1 s)
PROBE_PORT, FILLER_PORT = 80, 80  # VIP ports of the probe's services and of the fillers
CLONE_NEWNET = 0x40000000
IPT_CHUNK = 1000  # services per iptables-restore call (iptables-nft is quadratic in one call)


@dataclass(frozen=True)
class Settings:
    seconds: float
    warmup: float
    rounds: tuple[int, int, int]  # phases: no other service, `small`, `large`
    small: int  # services of the middle phase (and of ipt_<small>)
    large: int  # services of the last phase (and of ipt_<large>)
    effect_samples: tuple[int, int]  # create/update/delete timings with no other service, with `large`
    rest_budget: float  # seconds of REST creates towards `large`; the rest by documents + restart


FULL = Settings(3.0, 0.5, (4, 2, 3), 1000, 10_000, (20, 10), 60.0)
QUICK = Settings(1.0, 0.3, (1, 1, 1), 200, 2000, (5, 3), 5.0)


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# -- threads in the containers' network namespaces -------------------------------------------


def enter_netns(pid: int) -> None:
    """Move the calling thread (only it) into the network namespace of process `pid`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")
    finally:
        os.close(fd)


class Backends:
    """Two listeners in the server's namespace: OLD_PORT answers b"O", NEW_PORT b"N"."""

    def __init__(self, cleanup: Cleanup, pid: int) -> None:
        self.pid = pid
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cgb-backends", daemon=True)
        self.thread.start()
        cleanup.push("probe backends", self.close)
        if not self.ready.wait(10) or self.error:
            raise RuntimeError(f"the probe's backends did not start: {self.error}")

    def _run(self) -> None:
        try:
            enter_netns(self.pid)
            sel = selectors.DefaultSelector()
            for port, answer in ((OLD_PORT, b"O"), (NEW_PORT, b"N")):
                lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(("0.0.0.0", port))
                lsock.listen(256)
                sel.register(lsock, selectors.EVENT_READ, answer)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        with sel:
            while not self.stopping.is_set():
                for key, _ in sel.select(0.2):
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    with conn, contextlib.suppress(OSError):
                        conn.settimeout(0.5)
                        conn.recv(1)
                        conn.sendall(key.data)
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)


@dataclass
class Job:
    vip: str
    port: int
    want: bytes  # b"O", b"N", or b"" (refused or unreachable)
    deadline: float
    armed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    reached: float = 0.0  # perf_counter() when the first attempt that got `want` had connected
    attempts: int = 0
    error: str = ""


class Probe:
    """connect() to a VIP in a loop from a thread in the client container's namespace."""

    GAP = 0.0002  # between attempts that did not get what the job waits for

    def __init__(self, cleanup: Cleanup, pid: int) -> None:
        self.pid = pid
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="cgb-probe", daemon=True)
        self.thread.start()
        cleanup.push("probe thread", self.close)

    def _run(self) -> None:
        try:
            enter_netns(self.pid)
        except OSError as exc:
            while (job := self.jobs.get()) is not None:
                job.error = str(exc)
                job.armed.set()
                job.done.set()
            return
        while (job := self.jobs.get()) is not None:
            self._work(job)

    @staticmethod
    def attempt(vip: str, port: int) -> tuple[bytes, float]:
        """What a connect() to vip:port got (the backend's answer, b"" if refused or unreachable)
        and when it had connected (or failed)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((vip, port))
                connected = time.perf_counter()
                s.sendall(b"C")
                return s.recv(1) or b"?", connected
            except OSError:
                return b"", time.perf_counter()

    def _work(self, job: Job) -> None:
        try:
            got, _ = self.attempt(job.vip, job.port)
            job.attempts = 1
            if got == job.want:
                job.error = f"{job.vip}:{job.port} answered {got!r} before the change"
                return
            job.armed.set()
            while time.perf_counter() < job.deadline:
                got, when = self.attempt(job.vip, job.port)
                job.attempts += 1
                if got == job.want:
                    job.reached = when
                    return
                time.sleep(self.GAP)
            job.error = f"{job.vip}:{job.port} never answered {job.want!r}"
        finally:
            job.armed.set()
            job.done.set()

    def measure(self, vip: str, port: int, want: bytes, call: Callable[[], Any]) -> dict[str, float]:
        """Times `call` (a REST request) and until the VIP answers `want`, both from the call's start."""
        job = Job(vip, port, want, time.perf_counter() + 20)
        self.jobs.put(job)
        job.armed.wait(10)
        if job.error:
            raise RuntimeError(job.error)
        started = time.perf_counter()
        call()
        api = time.perf_counter() - started
        job.done.wait(30)
        if job.error or not job.reached:
            raise RuntimeError(job.error or "the probe did not finish")
        return {"api_ms": api * 1e3, "effective_ms": (job.reached - started) * 1e3, "attempts": job.attempts}

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


# -- the rig ---------------------------------------------------------------------------------


class LbRig(Rig):
    """datapath.Rig's dockerd, agent and containers, plus VIPs, services and kube-proxy's chains."""

    def __init__(self, cleanup: Cleanup, tag: str, rng: random.Random, settings: Settings) -> None:
        super().__init__(cleanup, tag, rng)
        self.settings = settings
        self.nat = f"{self.chain}-"  # CGB-<tag>-…
        self.comment = f"cgbench:{tag}"

    # addresses: cellgate's VIPs in the lower half of the /17, iptables' in the upper half
    def cg_vip(self, i: int) -> str:
        return str(self.vips.network_address + 1 + i)

    def ipt_vip(self, i: int) -> str:
        return str(self.vips.network_address + self.vips.num_addresses // 2 + 1 + i)

    def probe_vip(self, i: int) -> str:
        return str(self.vips.network_address + self.vips.num_addresses // 2 - 256 - i)

    @staticmethod
    def filler_backends(i: int) -> list[str]:
        """Two endpoints of filler service i, in 198.19.0.0/16 (no packet goes there)."""
        return [f"198.19.{i // 256 % 128}.{i % 256}:80", f"198.19.{128 + i // 256 % 128}.{i % 256}:80"]

    def build(self) -> None:
        t, s = self.tag, self.settings
        self.vips = rig.free_subnet("10.96.0.0/12", 17, self.rng)
        run("ip", "route", "add", "blackhole", str(self.vips))
        self.cleanup.push(f"blackhole {self.vips}", run, "ip", "route", "del", "blackhole", str(self.vips),
                          check=False)
        self._forwarding()
        bridge_net = rig.free_subnet("198.18.0.0/15", 24, self.rng)
        self.bridge = f"{t}br"
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.cleanup.push(f"bridge {self.bridge}", run, "ip", "link", "del", self.bridge, check=False)
        run("ip", "addr", "add", f"{bridge_net.network_address + 1}/{bridge_net.prefixlen}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        self.bridge_net = bridge_net
        forward = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", self.comment,
                   "-j", "ACCEPT"]
        run("iptables", "-w", "-I", forward[0], "1", *forward[1:])
        self.cleanup.push("FORWARD rule", self._delete_all, "filter", forward)

        self.dockerd = rig.Dockerd(self.cleanup, t, self.bridge)
        self.image = self.dockerd.image(self.rr, f"{t}/rr:1")
        bcli, self.br_server = self.pair(f"{t}b", None)
        self.dockerd("exec", "-d", f"{t}bs", "/rr", "-s", "-p", str(DNAT_PORT), "-C", str(self.server_cpu))
        net = self.agent_network(str(rig.free_subnet("10.64.0.0/10", 20, self.rng)))
        ccli, self.cg_server = self.pair(f"{t}o", net)
        self.cg_client = ccli
        run("nsenter", f"--net=/proc/{self._pid(ccli)}/ns/net", "ip", "route", "add", "blackhole", str(self.vips))
        self.api = self.agent.client()
        self.api.post("/v1/services", {"name": f"{t}-target", "frontend": f"{self.cg_vip(0)}:{rig.RR_PORT}",
                                       "backends": [f"{self.cg_server}:{rig.RR_PORT}"]})
        self.api.post("/v1/services", {"name": f"{t}-target-udp", "frontend": f"{self.cg_vip(0)}:{rig.RR_PORT}/udp",
                                       "backends": [f"{self.cg_server}:{rig.RR_PORT}"]})  # connect_cost's
        with timed("iptables: kube-proxy chains"):
            self.build_iptables(s.large)
        pid = self.agent.proc.pid if self.agent.proc else 0
        self.configs = {
            "cg_direct": Config("cg_direct", self._docker_client(ccli, self.cg_server), agent_pid=pid),
            "cg_vip": Config("cg_vip", self._docker_client(ccli, self.cg_vip(0)), agent_pid=pid),
            "br_direct": Config("br_direct", self._docker_client(bcli, self.br_server)),
        }
        for n in (1, s.small, s.large):
            name = f"ipt_{count_label(n)}"
            self.configs[name] = Config(name, self._docker_client(bcli, self.ipt_vip(0)), self._services_chain(n))
        for name, cfg in self.configs.items():  # every path answers before anything is measured
            cfg.enter()
            wait_until(lambda c=cfg: c.client("rr", 0.05, 0), 10, f"{name} to answer", every=0.1)
        self.backends = Backends(self.cleanup, self._pid(f"{t}os"))
        self.probe = Probe(self.cleanup, self._pid(ccli))

    # -- iptables, as kube-proxy writes them -------------------------------------------------

    def build_iptables(self, n: int) -> None:
        """SVC/SEP chains of n services (service 0 is the target: one endpoint, our bridge server);
        services chains S1, S<small>, S<large> listing 1, small, large of them, the target last;
        an entry chain jumped to from nat PREROUTING for our bridge, whose one rule picks a
        services chain."""
        c, s = self.nat, self.settings
        self.cleanup.push("nat chains", self._remove_nat)
        head = ["*nat", f":{c}N - [0:0]", f":{c}MARK - [0:0]", f"-A {c}MARK -j MARK --set-xmark 0x4000/0x4000"]
        head += [f":{c}S{count_label(k)} - [0:0]" for k in (1, s.small, s.large)]
        head += [f":{c}V0 - [0:0]", f":{c}E0 - [0:0]",
                 f"-A {c}V0 ! -s {self.bridge_net} -d {self.ipt_vip(0)}/32 -p tcp -m tcp --dport {rig.RR_PORT} "
                 f"-j {c}MARK",
                 f"-A {c}V0 -m comment --comment \"cgb/target -> {self.br_server}:{DNAT_PORT}\" -j {c}E0",
                 f"-A {c}E0 -s {self.br_server}/32 -j {c}MARK",
                 f"-A {c}E0 -p tcp -m tcp -j DNAT --to-destination {self.br_server}:{DNAT_PORT}"]
        rig.iptables_restore("\n".join([*head, "COMMIT", ""]))
        for lo in range(1, n, IPT_CHUNK):
            lines, rules = ["*nat"], []
            for i in range(lo, min(n, lo + IPT_CHUNK)):
                vip = self.ipt_vip(i)
                lines += [f":{c}V{i} - [0:0]", f":{c}E{i}a - [0:0]", f":{c}E{i}b - [0:0]"]
                rules += [f"-A {c}V{i} ! -s {self.bridge_net} -d {vip}/32 -p tcp -m tcp --dport {FILLER_PORT} "
                          f"-j {c}MARK",
                          f"-A {c}V{i} -m comment --comment \"cgb/s{i}\" -m statistic --mode random "
                          f"--probability 0.50000000000 -j {c}E{i}a",
                          f"-A {c}V{i} -m comment --comment \"cgb/s{i}\" -j {c}E{i}b"]
                for side, backend in zip("ab", self.filler_backends(i), strict=True):
                    host = backend.split(":")[0]
                    rules += [f"-A {c}E{i}{side} -s {host}/32 -j {c}MARK",
                              f"-A {c}E{i}{side} -p tcp -m tcp -j DNAT --to-destination {backend}"]
                for k in (s.small, s.large):
                    if i < k:
                        rules.append(self._service_rule(f"S{count_label(k)}", i, vip, FILLER_PORT))
            rig.iptables_restore("\n".join([*lines, *rules, "COMMIT", ""]))
        last = [self._service_rule(f"S{count_label(k)}", 0, self.ipt_vip(0), rig.RR_PORT)
                for k in (1, s.small, s.large)]
        rig.iptables_restore("\n".join(["*nat", *last, f"-A {c}N -j {c}S1", "COMMIT", ""]))
        jump = ["PREROUTING", "-i", self.bridge, "-m", "comment", "--comment", self.comment, "-j", f"{c}N"]
        run("iptables", "-w", "-t", "nat", "-I", jump[0], "1", *jump[1:])
        self.cleanup.push("PREROUTING jump", self._delete_all, "nat", jump)

    def _service_rule(self, chain: str, i: int, vip: str, port: int) -> str:
        return (f"-A {self.nat}{chain} -d {vip}/32 -p tcp -m comment --comment \"cgb/s{i} cluster IP\" "
                f"-m tcp --dport {port} -j {self.nat}V{i}")

    def _services_chain(self, n: int) -> Callable[[], None]:
        def enter() -> None:
            run("iptables", "-w", "-t", "nat", "-R", f"{self.nat}N", "1", "-j", f"{self.nat}S{count_label(n)}")
        return enter

    @staticmethod
    def _delete_all(table: str, rule: list[str]) -> None:
        while run("iptables", "-w", "-t", table, "-D", *rule, check=False).returncode == 0:
            pass

    def _remove_nat(self) -> None:
        """Every nat chain named CGB-<tag>-…: flushed and deleted, in chunks."""
        listed = run("iptables", "-w", "-t", "nat", "-S", timeout=300).stdout.splitlines()
        chains = [line.split()[1] for line in listed if line.startswith(f"-N {self.nat}")]
        flush = ["*nat", *(f"-F {ch}" for ch in chains), "COMMIT", ""]
        rig.iptables_restore("\n".join(flush))
        for lo in range(0, len(chains), 3 * IPT_CHUNK):
            rig.iptables_restore("\n".join(["*nat", *(f"-X {ch}" for ch in chains[lo:lo + 3 * IPT_CHUNK]),
                                            "COMMIT", ""]))

    # -- services ----------------------------------------------------------------------------

    def filler_body(self, i: int) -> dict[str, Any]:
        return {"name": f"{self.tag}-f{i}", "frontend": f"{self.cg_vip(i)}:{FILLER_PORT}",
                "backends": self.filler_backends(i)}

    def load_rest(self, lo: int, hi: int, budget: float = 0.0) -> dict[str, Any]:
        """Fillers lo.. (VIPs 1..) by POST /v1/services, one by one, until hi-1 or, with a budget,
        until `budget` seconds have passed; `next` is the first filler not made."""
        latencies = []
        started = time.monotonic()
        i = lo
        while i < hi and not (budget and time.monotonic() - started > budget):
            t0 = time.perf_counter()
            self.api.post("/v1/services", self.filler_body(i))
            latencies.append((time.perf_counter() - t0) * 1e3)
            i += 1
        total = time.monotonic() - started
        return {"first": lo, "next": i, "services": i - lo, "seconds": total, "create_ms": latencies,
                "first100_p50_ms": median_of(latencies[:100]), "last100_p50_ms": median_of(latencies[-100:])}

    def load_restore(self, lo: int, hi: int) -> dict[str, Any]:
        """Fillers lo..hi-1 written as service documents of the agent while it is stopped (the
        shape of one the agent wrote itself, filler lo-1), then an agent restart restores them
        (and numbers them itself)."""
        from ipam.store import file_name

        directory = self.agent.state / "services"
        template = json.loads((directory / file_name(f"{self.tag}-f{lo - 1}")).read_bytes())
        self.agent.stop()
        started = time.monotonic()
        for i in range(lo, hi):
            body = self.filler_body(i)
            (directory / file_name(body["name"])).write_bytes(
                json.dumps({**template, **body}, sort_keys=True, separators=(",", ":")).encode())
        os.sync()
        written = time.monotonic() - started
        to_api = self.agent.start(timeout=600)
        spawned = time.monotonic() - to_api
        # the new agent process stops first in the cleanup: the containers must go before it
        self.cleanup.push("containers on the agent's network", self.dockerd.remove_containers)
        reader = self._lb_reader()
        try:
            wait_until(lambda: self._has_service(reader, self.cg_vip(hi - 1), FILLER_PORT), 600,
                       "the restored services in the kernel", every=0.01)
        finally:
            reader.close()
        in_map = time.monotonic() - spawned
        pid = self.agent.proc.pid if self.agent.proc else 0
        self.configs["cg_direct"].agent_pid = self.configs["cg_vip"].agent_pid = pid
        count = len(self.api.get("/v1/services"))
        if count != hi + 1:  # the fillers, the target and its UDP twin
            raise RuntimeError(f"the agent restored {count} services, not {hi + 1}")
        return {"first": lo, "services": hi - lo, "documents_written_s": written, "restart_to_api_s": to_api,
                "restart_to_kernel_s": in_map}

    def _lb_reader(self) -> Any:
        from datapath.kernel import bpfsys, layout

        return bpfsys.MapReader(str(self.agent.bpf / "cg_lb_services"), ctypes.sizeof(layout.CgLbValue))

    @staticmethod
    def _has_service(reader: Any, vip: str, port: int) -> bool:
        from datapath.kernel import layout

        return reader.lookup(layout.lb_key(ipaddress.ip_address(vip), port, 6, 0)) is not None

    def connect_cost(self, calls: int = 20_000, batches: int = 7) -> dict[str, Any]:
        """ns per connect() of a UDP socket in the client container's namespace: to the target VIP
        (the connect4 program finds the service and rewrites) and straight to the server (it looks
        up and misses). No packet is sent; what differs between phases is the map lookup."""
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                enter_netns(self._pid(self.cg_client))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    for name, address in (("vip", self.cg_vip(0)), ("straight", self.cg_server)):
                        per_batch = []
                        for _ in range(batches):
                            t0 = time.perf_counter_ns()
                            for _ in range(calls):
                                sock.connect((address, rig.RR_PORT))
                            per_batch.append((time.perf_counter_ns() - t0) / calls)
                        result[name] = {"ns": per_batch, "median": statistics.median(per_batch)}
            except BaseException as exc:  # reported below, from the calling thread
                result["error"] = repr(exc)

        thread = threading.Thread(target=work, name="cgb-connect-cost", daemon=True)
        thread.start()
        thread.join(120)
        if "error" in result or thread.is_alive():
            raise RuntimeError(f"connect() cost: {result.get('error', 'timed out')}")
        return result

    def effects(self, n: int, first: int) -> list[dict[str, Any]]:
        """n rounds of create → effective, update → effective, delete → effective on probe VIPs."""
        out = []
        for k in range(first, first + n):
            name, vip = f"{self.tag}-p{k}", self.probe_vip(k)
            old, new = f"{self.cg_server}:{OLD_PORT}", f"{self.cg_server}:{NEW_PORT}"
            create = {"name": name, "frontend": f"{vip}:{PROBE_PORT}", "backends": [old]}
            steps: list[tuple[str, bytes, Callable[[], Any]]] = [
                ("create", b"O", functools.partial(self.api.post, "/v1/services", create)),
                ("update", b"N", functools.partial(self.api.call, "PUT", f"/v1/services/{name}", {"backends": [new]})),
                ("delete", b"", functools.partial(self.api.call, "DELETE", f"/v1/services/{name}")),
            ]
            sample: dict[str, Any] = {"vip": vip}
            for op, want, call in steps:
                sample[op] = self.probe.measure(vip, PROBE_PORT, want, call)
            out.append(sample)
        return out


# -- measuring -------------------------------------------------------------------------------


def rounds(r: LbRig, phase: str, names: Sequence[str], count: int, samples: list[dict[str, Any]],
           rng: random.Random) -> None:
    s = r.settings
    for rnd in range(count):
        order = list(names)
        rng.shuffle(order)
        log.info("phase %s, round %d/%d: %s", phase, rnd + 1, count, " ".join(order))
        for name in order:
            cfg = r.configs[name]
            cfg.enter()
            line = []
            for mode in MODES:
                cpu0 = cpu_seconds(cfg.agent_pid) if cfg.agent_pid else 0.0
                result = cfg.client(mode, s.seconds, s.warmup)
                sample = {"phase": phase, "round": rnd, "config": name, "mode": mode, **result}
                if cfg.agent_pid:
                    sample["agent_cpu_s"] = cpu_seconds(cfg.agent_pid) - cpu0
                samples.append(sample)
                line.append(f"{mode} {result.get('tps', 0):8.0f}/s")
            log.info("  %-10s %s", name, "  ".join(line))


def paired(samples: Sequence[dict[str, Any]], phase: str, config: str, base: str, mode: str) -> list[float]:
    """Per-round ratios config / base of one phase and mode."""
    by_round: dict[int, dict[str, float]] = {}
    for x in samples:
        if x["phase"] == phase and x["mode"] == mode and x["config"] in (config, base) and x.get("tps"):
            by_round.setdefault(x["round"], {})[x["config"]] = float(x["tps"])
    return [v[config] / v[base] for v in by_round.values() if config in v and base in v]


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def rate(samples: Sequence[dict[str, Any]], phase: str, config: str, mode: str, key: str = "") -> float:
    return median_of([float(x["lat_us"][key] if key else x["tps"]) for x in samples
                      if x["phase"] == phase and x["config"] == config and x["mode"] == mode and x.get("tps")])


def effect_summary(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {op: {key: summary([x[op][key] for x in samples]) for key in ("api_ms", "effective_ms")}
            for op in ("create", "update", "delete")}


def projected_rest_seconds(create_ms: Sequence[float], n: int) -> float:
    """Seconds to make n services one by one over REST, from a straight line through the measured
    create latencies (each create costs more with every service that exists)."""
    xs = list(range(len(create_ms)))
    slope, intercept = statistics.linear_regression(xs, create_ms)
    return (intercept * n + slope * n * n / 2) / 1e3


def analyse(out: dict[str, Any]) -> None:
    s, x = out["settings"], out["samples"]
    small, large = count_label(s["small"]), count_label(s["large"])
    phases = ("0", small, large)
    ratios: dict[str, Any] = {}
    for mode in MODES:
        ratios[f"vip_vs_direct_{mode}"] = {p: median_of(paired(x, p, "cg_vip", "cg_direct", mode)) for p in phases}
        ratios[f"vip_vs_ipt_{mode}"] = {
            small: median_of(paired(x, small, "cg_vip", f"ipt_{small}", mode)),
            large: median_of(paired(x, large, "cg_vip", f"ipt_{large}", mode)),
            "1": median_of(paired(x, "0", "cg_vip", "ipt_1", mode))}
        a = median_of(paired(x, "0", "cg_vip", "br_direct", mode))
        c = median_of(paired(x, large, "cg_vip", "br_direct", mode))
        ratios[f"loaded_{mode}"] = {
            "vs_br_direct": c / a if a else 0.0,
            "vs_cg_direct": (ratios[f"vip_vs_direct_{mode}"][large] / ratios[f"vip_vs_direct_{mode}"]["0"]
                             if ratios[f"vip_vs_direct_{mode}"]["0"] else 0.0),
            "raw": (rate(x, large, "cg_vip", mode) / rate(x, "0", "cg_vip", mode)) if rate(x, "0", "cg_vip", mode)
            else 0.0}
    out["ratios"] = ratios
    out["effects_summary"] = {p: effect_summary(v) for p, v in out["effects"].items() if v}
    create_ms = [ms for part in out["loading"]["rest"] for ms in part["create_ms"]]
    out["loading"]["projected_rest_s"] = {large: projected_rest_seconds(create_ms, s["large"])}
    e0 = out["effects_summary"]["0"]
    el = out["effects_summary"].get(large, e0)
    rv = ratios
    cc = out["connect_cost"]
    cc["loaded_vs_empty"] = {k: cc[large][k]["median"] / cc["0"][k]["median"] for k in ("vip", "straight")}
    out["goals"] = [
        goal("RR to a VIP ≥ 0.97x straight to the backend", rv["vip_vs_direct_rr"]["0"], 0.97, "x"),
        goal("CRR to a VIP ≥ 0.97x straight to the backend", rv["vip_vs_direct_crr"]["0"], 0.97, "x"),
        goal(f"CRR cellgate / iptables DNAT at {large} services ≥ 10x", rv["vip_vs_ipt_crr"][large], 10.0, "x"),
        goal("service create → effective p50 ≤ 10 ms (no other service)",
             e0["create"]["effective_ms"]["median"], 10.0, "ms", below=True),
        goal("service update → effective p50 ≤ 10 ms (no other service)",
             e0["update"]["effective_ms"]["median"], 10.0, "ms", below=True),
        goal(f"service create → effective p50 ≤ 10 ms ({large} services)",
             el["create"]["effective_ms"]["median"], 10.0, "ms", below=True),
        goal(f"service update → effective p50 ≤ 10 ms ({large} services)",
             el["update"]["effective_ms"]["median"], 10.0, "ms", below=True),
        goal(f"connect() to a VIP with {large} services at most 5% slower than with none (its map lookup)",
             cc["loaded_vs_empty"]["vip"], 1.05, "x", below=True),
        goal(f"RR to a VIP with {large} services at most 5% below no other service (paired with cg_direct)",
             rv["loaded_rr"]["vs_cg_direct"], 0.95, "x"),
        goal(f"CRR to a VIP with {large} services at most 5% below no other service (paired with cg_direct)",
             rv["loaded_crr"]["vs_cg_direct"], 0.95, "x"),
    ]


def goal(what: str, value: float, target: float, unit: str, below: bool = False) -> dict[str, Any]:
    met = value <= target if below else value >= target
    return {"goal": what, "value": value, "unit": unit, "met": bool(met)}


def run_lb(quick: bool = False, seed: int = 13) -> dict[str, Any]:
    s = QUICK if quick else FULL
    rng = random.Random(seed)
    tag = new_tag()
    small, large = count_label(s.small), count_label(s.large)
    samples: list[dict[str, Any]] = []
    out: dict[str, Any] = {"tier": "lb", "machine": machine(), "started": time.time(), "seed": seed, "tag": tag,
                           "settings": {"seconds": s.seconds, "warmup": s.warmup, "rounds": list(s.rounds),
                                        "small": s.small, "large": s.large,
                                        "effect_samples": list(s.effect_samples), "rest_budget_s": s.rest_budget,
                                        "quick": quick},
                           "samples": samples, "effects": {}, "loading": {}}
    with Cleanup() as cleanup:
        r = LbRig(cleanup, tag, rng, s)
        with timed("lb rig"):
            r.build()
        out["vips"] = str(r.vips)
        out["connect_cost"] = {"0": r.connect_cost()}
        rounds(r, "0", ("cg_direct", "cg_vip", "br_direct", "ipt_1"), s.rounds[0], samples, rng)
        with timed("create/update/delete → effective, no other service"):
            out["effects"]["0"] = r.effects(s.effect_samples[0], 0)
        with timed(f"{s.small} services by REST"):
            out["loading"]["rest"] = [r.load_rest(1, s.small)]
        rounds(r, small, ("cg_direct", "cg_vip", f"ipt_{small}"), s.rounds[1], samples, rng)
        with timed(f"up to {s.large} services by REST, for at most {s.rest_budget:.0f} s"):
            more = r.load_rest(s.small, s.large, s.rest_budget)
            out["loading"]["rest"].append(more)
        if more["next"] < s.large:
            with timed(f"{s.large - more['next']} more services as documents + agent restart"):
                out["loading"]["restore"] = r.load_restore(more["next"], s.large)
        out["connect_cost"][large] = r.connect_cost()
        rounds(r, large, ("cg_direct", "cg_vip", "br_direct", f"ipt_{large}"), s.rounds[2], samples, rng)
        with timed(f"create/update/delete → effective, {s.large} services"):
            out["effects"][large] = r.effects(s.effect_samples[1], s.effect_samples[0])
        out["agent_status"] = r.api.get("/v1/status")
        out["agent_rss_kib"] = r.agent.rss_kib()
    out["seconds"] = time.time() - out["started"]
    analyse(out)
    return out


# -- output ----------------------------------------------------------------------------------


def markdown(out: dict[str, Any]) -> str:
    s, x, rv = out["settings"], out["samples"], out["ratios"]
    small, large = count_label(s["small"]), count_label(s["large"])
    lines = [f"## LB tier (run tag {out['tag']}, {s['rounds']} rounds of {s['seconds']:.0f} s per phase)", "",
             "| phase (other services) | path | TCP_RR /s | RR p50 µs | TCP_CRR /s | CRR p50 µs |",
             "|---|---|---:|---:|---:|---:|"]
    seen = []
    for sample in x:
        key = (sample["phase"], sample["config"])
        if key not in seen:
            seen.append(key)
    for phase, config in seen:
        lines.append(f"| {phase} | {config} | {rate(x, phase, config, 'rr'):.0f} | "
                     f"{rate(x, phase, config, 'rr', 'p50'):.1f} | {rate(x, phase, config, 'crr'):.0f} | "
                     f"{rate(x, phase, config, 'crr', 'p50'):.1f} |")
    lines += ["", "| ratio (paired per round, median) | RR | CRR |", "|---|---:|---:|"]
    for phase in ("0", small, large):
        lines.append(f"| VIP / straight to the backend, {phase} services | {rv['vip_vs_direct_rr'][phase]:.3f} | "
                     f"{rv['vip_vs_direct_crr'][phase]:.3f} |")
    for n in ("1", small, large):
        lines.append(f"| cellgate VIP / iptables DNAT, {n} services | {rv['vip_vs_ipt_rr'][n]:.2f} | "
                     f"{rv['vip_vs_ipt_crr'][n]:.2f} |")
    for key, label in (("vs_br_direct", "against br_direct"), ("vs_cg_direct", "against cg_direct"),
                       ("raw", "raw rates")):
        lines.append(f"| VIP with {large} / with 0 services, {label} | {rv['loaded_rr'][key]:.3f} | "
                     f"{rv['loaded_crr'][key]:.3f} |")
    cc = out["connect_cost"]
    lines += ["", "| connect() of a UDP socket (no packet) | no other service | "
              f"{large} services | ratio |", "|---|---:|---:|---:|"]
    for k, label in (("vip", "to the VIP (found, rewritten)"), ("straight", "straight to the server (missed)")):
        lines.append(f"| {label} | {cc['0'][k]['median']:.0f} ns | {cc[large][k]['median']:.0f} ns | "
                     f"{cc['loaded_vs_empty'][k]:.3f} |")
    lines += ["", "| services | operation | REST call p50 / p95 ms | effective p50 / p95 / max ms |",
              "|---|---|---:|---:|"]
    for phase, ops in out["effects_summary"].items():
        for op, v in ops.items():
            a, e = v["api_ms"], v["effective_ms"]
            lines.append(f"| {phase} | {op} | {a['median']:.1f} / {a['p95']:.1f} | "
                         f"{e['median']:.1f} / {e['p95']:.1f} / {e['max']:.1f} |")
    ld = out["loading"]
    lines.append("")
    for part in ld["rest"]:
        lines.append(f"- services {part['first'] + 1} to {part['next']} by REST one by one: {part['seconds']:.1f} s; "
                     f"create p50 {part['first100_p50_ms']:.1f} ms for the first 100, "
                     f"{part['last100_p50_ms']:.1f} ms for the last 100")
    lines.append(f"- {large} by REST one by one would take ≈ {ld['projected_rest_s'][large]:.0f} s "
                 "(straight-line fit of the create latencies)")
    restore = ld.get("restore")
    if restore:
        lines.append(f"- services {restore['first'] + 1} to {s['large']} as service documents + agent restart: "
                     f"documents {restore['documents_written_s']:.1f} s, restart → API "
                     f"{restore['restart_to_api_s']:.1f} s, → last service in the kernel map "
                     f"{restore['restart_to_kernel_s']:.1f} s")
    lines += ["", "| goal | measured | met |", "|---|---:|---|"]
    for g in out["goals"]:
        value = f"{g['value']:.3f}x" if g["unit"] == "x" else f"{g['value']:.1f} ms"
        lines.append(f"| {g['goal']} | {value} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lb", description="cellgate LB benchmarks (issue 13)")
    parser.add_argument("--run", default=os.environ.get("BENCH_RUN", ""), help="run ID (default: a new timestamp)")
    parser.add_argument("--quick", action="store_true", help="one short round per phase, 200/2000 services")
    parser.add_argument("--seed", type=int, default=13, help="shuffle and address seed [13]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pyroute2", "datapath", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("bench: the lb tier needs root", file=sys.stderr)
        return 2
    run_id = args.run or new_run_id()
    try:
        out = run_lb(quick=args.quick, seed=args.seed)
    except Interrupted as exc:
        print(f"bench: interrupted ({exc}); everything this run made has been removed", file=sys.stderr)
        return 130
    write_raw(run_id, "lb", out)
    text = markdown(out)
    (run_dir(run_id) / "lb.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
