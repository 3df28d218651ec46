"""Soak tier (issue 15): a 3-node simulated cluster under container churn, policy changes and
cross-node probes for N minutes; agent resources and map entries must stay flat, every allowed
probe must connect and no denied probe may. Bench only, never CI.

    python -m bench soak [--minutes 30] [--run ID] [--seed S]      (`make bench-soak`)

- churn: endpoints made and removed through the real cellgate-cni binary, CHURN_RATE creates
  (and as many deletes) per second over the nodes, each in a namespace made for it; each of a
  node's CHURN_WORKERS keeps POOL of them, one per label group, so every sample point sees the
  same population.
- policy: every POLICY_EVERY seconds one rule set of a seeded catalogue replaces the last
  (`cellgate policy import`, `policy delete --labels` for rules it drops) on every node, then
  `/v1/policy/wait` on each; client egress and server ingress rules, some with ingressDeny.
- probes: a TCP connect + 1 byte each way (rr's CRR, a server thread here) from each client
  endpoint to the servers on the other nodes, two ports, IPv4 and IPv6, from sockets opened in
  the client's namespace. A probe is judged only if every rule-set mix it may have met (the nodes
  change one after the other) gives the same verdict.
- samples once a minute with churn paused and the reference rule set in force: per agent RSS,
  fds, threads (and its L7 proxy's), entry counts of every hash/LPM map it pinned (bpftool in
  its mount namespace), status counts, links and routes of the node namespace, etcd keys by kind;
  host links and namespaces. A last sample after the churn endpoints are gone and the reference
  rules are back is compared with the first.

Flat (after the first minute of warm-up; growth = least-squares slope x the window):
- agent and proxy RSS: growth <= max(4 MiB, 5 %); fds and threads: growth <= 4;
- conntrack and the LB's LRU maps (traffic-driven): growth <= max(256, 50 %);
- every other count (maps, pins, endpoints, identities, rules, links, routes, our namespaces,
  etcd keys): the same at every sample after warm-up, and back to its first value at the end.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import json
import os
import random
import selectors
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import _etcd_keys
from bench.common import PREFIX, ROOT, Cleanup, log, machine, run, summary, wait_until
from tests.simcluster import CNI, RUN_DIR, Cluster, SimEndpoint, SimNode

NODES = (1, 2, 3)
PORTS = (7001, 7002)
FAMILIES = (socket.AF_INET, socket.AF_INET6)
CHURN_RATE = 5.0  # endpoint creates per second over all nodes (and as many deletes)
CHURN_WORKERS = 2  # churn threads per node, so that slow CNI calls on a busy machine keep the rate
POOL = 2  # churn endpoints each worker keeps; its oldest goes before the next is made
POLICY_EVERY = 5.0  # seconds between rule-set changes
PROBE_EVERY = 0.5  # seconds between the starts of one target's probes
PROBE_TIMEOUT = 2.0  # connect + 1 byte each way; allows one SYN retransmit (1 s)
SLOW_PROBE = 0.5  # an allowed probe slower than this is counted as slow (information)
SAMPLE_EVERY = 60.0
WARMUP = 60.0
CATALOGUE = 8  # random rule sets besides the reference one
RSS_TOLERANCE = (4 * 1024, 0.05)  # KiB floor, share of the level
COUNT_TOLERANCE = 4  # fds, threads
TRAFFIC_TOLERANCE = (256, 0.5)  # entries floor, share of the level
TRAFFIC_MAPS = ("cg_ct", "cg_lb_sock", "cg_lb_flows")
COUNTED_MAP_TYPES = ("hash", "lru_hash", "lpm_trie", "percpu_hash", "lru_percpu_hash")
MAX_FAILURES = 500

# -- rule sets and what they allow -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    client: int  # node of the client endpoint c<i>
    server: int  # node of the server endpoint s<j>, another node
    port: int
    family: int

    def __str__(self) -> str:
        return f"c{self.client}->s{self.server}:{self.port}/{'v4' if self.family == socket.AF_INET else 'v6'}"


TARGETS = tuple(Target(i, j, p, f) for i in NODES for j in NODES if i != j for p in PORTS for f in FAMILIES)


@dataclass(frozen=True)
class ServerRule:
    clients: frozenset[int]
    ports: frozenset[int]
    deny: tuple[int, int] | None  # (client, port) an ingressDeny entry refuses


@dataclass(frozen=True)
class ClientRule:
    servers: frozenset[int]
    ports: frozenset[int]


@dataclass(frozen=True)
class RuleSet:
    """One rule per server (ingress) and per client (egress); None = no rule, so that direction
    of that endpoint is open (default allow until selected). A churn rule is always in."""

    name: str
    servers: tuple[tuple[int, ServerRule | None], ...]
    clients: tuple[tuple[int, ClientRule | None], ...]

    def egress_allows(self, t: Target) -> bool:
        rule = dict(self.clients)[t.client]
        return rule is None or (t.server in rule.servers and t.port in rule.ports)

    def ingress_allows(self, t: Target) -> bool:
        rule = dict(self.servers)[t.server]
        if rule is None:
            return True
        return t.client in rule.clients and t.port in rule.ports and rule.deny != (t.client, t.port)

    def allows(self, t: Target) -> bool:
        return self.egress_allows(t) and self.ingress_allows(t)

    def labels(self) -> set[str]:
        return (
            {"cgb-soak-churn"}
            | {f"cgb-soak-srv{j}" for j, r in self.servers if r is not None}
            | {f"cgb-soak-cli{i}" for i, r in self.clients if r is not None}
        )

    def rules(self) -> list[dict[str, Any]]:
        def ports(ps: Iterable[int]) -> list[dict[str, Any]]:
            return [{"ports": [{"port": str(p), "protocol": "TCP"} for p in sorted(ps)]}]

        out: list[dict[str, Any]] = [
            {
                "labels": [{"key": "name", "value": "cgb-soak-churn"}],
                "endpointSelector": {"matchLabels": {"app": "cgb-soak-churn"}},
                "ingress": [
                    {"fromEndpoints": [{"matchLabels": {"app": "cgb-soak-cli"}}], "toPorts": ports([PORTS[0]])}
                ],
                "egress": [{"toEndpoints": [{"matchLabels": {"app": "cgb-soak-srv"}}]}],
            }
        ]
        for j, srv in self.servers:
            if srv is None:
                continue
            rule: dict[str, Any] = {
                "labels": [{"key": "name", "value": f"cgb-soak-srv{j}"}],
                "endpointSelector": {"matchLabels": {"srv": f"s{j}"}},
                "ingress": [
                    {
                        "fromEndpoints": [{"matchLabels": {"cli": f"c{i}"}} for i in sorted(srv.clients)],
                        "toPorts": ports(srv.ports),
                    }
                ],
            }
            if srv.deny:
                rule["ingressDeny"] = [
                    {"fromEndpoints": [{"matchLabels": {"cli": f"c{srv.deny[0]}"}}], "toPorts": ports([srv.deny[1]])}
                ]
            out.append(rule)
        for i, cli in self.clients:
            if cli is None:
                continue
            out.append(
                {
                    "labels": [{"key": "name", "value": f"cgb-soak-cli{i}"}],
                    "endpointSelector": {"matchLabels": {"cli": f"c{i}"}},
                    "egress": [
                        {
                            "toEndpoints": [{"matchLabels": {"srv": f"s{j}"}} for j in sorted(cli.servers)],
                            "toPorts": ports(cli.ports),
                        }
                    ],
                }
            )
        return out


def reference_rules() -> RuleSet:
    """In force at every sample: every server admits the other nodes' clients on the first port
    only, every client may reach every other node's server on both ports."""
    return RuleSet(
        "ref",
        tuple((j, ServerRule(frozenset(i for i in NODES if i != j), frozenset(PORTS[:1]), None)) for j in NODES),
        tuple((i, ClientRule(frozenset(j for j in NODES if j != i), frozenset(PORTS))) for i in NODES),
    )


def random_rules(rng: random.Random, name: str) -> RuleSet:
    """A rule set that allows some targets and denies others; rules left out now and then."""
    while True:
        servers: list[tuple[int, ServerRule | None]] = []
        for j in NODES:
            others = [i for i in NODES if i != j]
            if rng.random() < 0.15:
                servers.append((j, None))
                continue
            deny = (rng.choice(others), rng.choice(PORTS)) if rng.random() < 0.3 else None
            servers.append(
                (
                    j,
                    ServerRule(
                        frozenset(rng.sample(others, rng.randint(1, 2))),
                        frozenset(rng.sample(PORTS, rng.randint(1, 2))),
                        deny,
                    ),
                )
            )
        clients: list[tuple[int, ClientRule | None]] = []
        for i in NODES:
            others = [j for j in NODES if j != i]
            if rng.random() < 0.2:
                clients.append((i, None))
                continue
            clients.append(
                (
                    i,
                    ClientRule(
                        frozenset(rng.sample(others, rng.randint(1, 2))),
                        frozenset(rng.sample(PORTS, rng.randint(1, 2))),
                    ),
                )
            )
        rules = RuleSet(name, tuple(servers), tuple(clients))
        verdicts = {rules.allows(t) for t in TARGETS}
        if verdicts == {True, False}:
            return rules


class Expectations:
    """What a probe may see. Every change bumps the generation twice: at its start (the rule sets
    that may be in force on some node grow by the new one) and once every node enforces it (only
    the new one). The client's egress is decided on its node, the server's ingress on its own, so
    during a change any mix of the versions is possible."""

    def __init__(self, rules: RuleSet) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        self._states: dict[int, tuple[RuleSet, ...]] = {0: (rules,)}
        self.settled_at = time.monotonic()

    def begin(self, new: RuleSet) -> None:
        with self._lock:
            versions = self._states[self.generation]
            self.generation += 1
            self._states[self.generation] = (*versions, new) if new not in versions else versions

    def settle(self, rules: RuleSet) -> None:
        with self._lock:
            self.generation += 1
            self._states[self.generation] = (rules,)
            self.settled_at = time.monotonic()

    def current(self) -> tuple[RuleSet, ...]:
        with self._lock:
            return self._states[self.generation]

    def possible(self, t: Target, first: int, last: int) -> set[bool]:
        with self._lock:
            states = [self._states[g] for g in range(first, last + 1)]
        return {a.egress_allows(t) and b.ingress_allows(t) for versions in states for a in versions for b in versions}


# -- the cluster, probes and their server ----------------------------------------------------


class SoakCluster(Cluster):
    """tests.simcluster.Cluster whose description may be written from several threads, and whose
    endpoint removal reports a failed CNI DEL (the namespace goes in any case)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.Lock()

    def write(self) -> None:
        with self._write_lock:
            super().write()

    def agent_alive(self, node: SimNode) -> bool:
        proc = self._procs.get(node.name)
        return proc is not None and proc.poll() is None

    def remove_endpoint(self, ep: SimEndpoint) -> None:
        node = next(n for n in self.nodes if n.name == ep.node)
        conf = {"cniVersion": "1.0.0", "name": f"cg{self.tag}net", "type": "cellgate-cni", "socket": node.api_socket}
        env = dict(
            os.environ,
            CNI_COMMAND="DEL",
            CNI_CONTAINERID=ep.cid,
            CNI_NETNS=f"/run/netns/{ep.netns}",
            CNI_IFNAME="eth0",
            CNI_PATH=str(Path(CNI).parent),
        )
        try:
            out = run(CNI, input=json.dumps(conf), env=env, check=False, timeout=60)
        finally:
            run("ip", "netns", "del", ep.netns, check=False)
            with contextlib.suppress(ValueError):
                self.endpoints.remove(ep)
            self.write()
        if out.returncode != 0:
            raise RuntimeError(f"CNI DEL of {ep.cid} on {node.name}: {out.stdout.strip()} {out.stderr.strip()}")


def _socket_in(ns: str, family: int) -> socket.socket:
    from datapath.kernel.netns import socket_in

    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return socket_in(fd, family, socket.SOCK_STREAM)
    finally:
        os.close(fd)


class EchoServer:
    """One thread answering every server endpoint's ports: a connection's first byte gets one byte
    back, then the server closes (rr's CRR); a connection that sends nothing goes after 3 s."""

    def __init__(self, cleanup: Cleanup, servers: Iterable[SimEndpoint], errors: list[str]) -> None:
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._errors = errors
        cleanup.push("probe servers", self.close)
        for ep in servers:
            for family, address in ((socket.AF_INET, ep.ipv4), (socket.AF_INET6, ep.ipv6)):
                for port in PORTS:
                    s = _socket_in(ep.netns, family)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
                    s.listen(512)
                    s.setblocking(False)
                    self._sel.register(s, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="cgb-soak-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception:
                self._errors.append("server: " + traceback.format_exc(limit=3))
                time.sleep(0.1)

    def _once(self) -> None:
        for key, _ in self._sel.select(0.2):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data is None:
                with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                    conn, _ = s.accept()
                    conn.setblocking(False)
                    self._sel.register(conn, selectors.EVENT_READ, time.monotonic() + 3.0)
                continue
            with contextlib.suppress(OSError):
                if s.recv(1):
                    s.send(b"C")
            self._drop(s)
        now = time.monotonic()
        for key in [k for k in self._sel.get_map().values() if k.data is not None and k.data < now]:
            self._drop(key.fileobj)  # type: ignore[arg-type]

    def _drop(self, s: socket.socket) -> None:
        self._sel.unregister(s)
        s.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self._sel.get_map().values()):
            self._drop(key.fileobj)  # type: ignore[arg-type]
        self._sel.close()


def probe(client: SimEndpoint, server: SimEndpoint, t: Target) -> tuple[str, bool, float]:
    """(outcome, handshake completed, seconds): "ok" when the byte came back in time."""
    started = time.monotonic()
    address = server.ipv4 if t.family == socket.AF_INET else server.ipv6
    try:
        s = _socket_in(client.netns, t.family)
    except Exception as exc:
        return f"socket: {exc}", False, time.monotonic() - started
    handshake = False
    try:
        s.settimeout(PROBE_TIMEOUT)
        s.connect((address, t.port))
        handshake = True
        s.settimeout(max(0.05, PROBE_TIMEOUT - (time.monotonic() - started)))
        s.sendall(b"C")
        outcome = "ok" if s.recv(1) == b"C" else "closed"
    except TimeoutError:
        outcome = "reply-timeout" if handshake else "connect-timeout"
    except OSError as exc:
        stage = "reply" if handshake else "connect"
        outcome = f"{stage}-{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    finally:
        s.close()
    return outcome, handshake, time.monotonic() - started


class Probes:
    """One thread per target, each starting a probe every PROBE_EVERY s; the tally and the
    failures (a failed allowed probe, a denied probe whose handshake completed)."""

    def __init__(self, eps: dict[str, SimEndpoint], expect: Expectations, started: float) -> None:
        self._eps = eps
        self._expect = expect
        self._started = started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.tally = {str(t): collections.Counter() for t in TARGETS}
        self.latency_ms: list[float] = []
        self.failures: list[dict[str, Any]] = []
        self._threads = [
            threading.Thread(target=self._loop, args=(t,), name=f"cgb-probe-{t}", daemon=True) for t in TARGETS
        ]

    def start(self) -> None:
        for th in self._threads:
            th.start()

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            if th.ident is not None:
                th.join(PROBE_TIMEOUT + 5)

    def _loop(self, t: Target) -> None:
        client, server = self._eps[f"c{t.client}"], self._eps[f"s{t.server}"]
        next_at = time.monotonic()
        while not self._stop.is_set():
            first = self._expect.generation
            outcome, handshake, seconds = probe(client, server, t)
            last = self._expect.generation
            self._record(t, self._expect.possible(t, first, last), outcome, handshake, seconds, first)
            next_at = max(next_at + PROBE_EVERY, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def _record(self, t: Target, possible: set[bool], outcome: str, handshake: bool, seconds: float, gen: int) -> None:
        ok = outcome == "ok"
        with self._lock:
            tally = self.tally[str(t)]
            if len(possible) != 1:
                tally["unjudged"] += 1
                return
            if possible == {True}:
                tally["allowed_ok" if ok else "allowed_failed"] += 1
                if ok:
                    self.latency_ms.append(seconds * 1000)
                    if seconds > SLOW_PROBE:
                        tally["allowed_slow"] += 1
                    return
            else:
                tally["denied_connected" if handshake else "denied_blocked"] += 1
                if not handshake:
                    return
            if len(self.failures) < MAX_FAILURES:
                self.failures.append(
                    {
                        "t": round(time.monotonic() - self._started, 3),
                        "target": str(t),
                        "expected": "allow" if possible == {True} else "deny",
                        "outcome": outcome,
                        "handshake": handshake,
                        "ms": round(seconds * 1000, 1),
                        "generation": gen,
                        "rules": self._expect.current()[-1].name,
                        "since_settled_s": round(time.monotonic() - self._expect.settled_at, 3),
                    }
                )

    def totals(self) -> dict[str, int]:
        with self._lock:
            out: collections.Counter[str] = collections.Counter()
            for tally in self.tally.values():
                out.update(tally)
            return {
                k: out.get(k, 0)
                for k in (
                    "allowed_ok",
                    "allowed_failed",
                    "allowed_slow",
                    "denied_blocked",
                    "denied_connected",
                    "unjudged",
                )
            }


# -- churn and policy changes ----------------------------------------------------------------


class Churn:
    """One churn worker of a node: remove its oldest endpoint (once it has POOL), make the next one
    (labels app=cgb-soak-churn, grp=n<i>w<w>g<k mod POOL>: between two steps the worker holds one
    of each of its groups). `lock` is held for a step; the sampler takes it to pause the churn."""

    def __init__(self, c: SoakCluster, node: SimNode, worker: int, period: float, errors: list[str]) -> None:
        self.c, self.node, self.period = c, node, period
        self.name = f"n{node.index}w{worker}"
        self.lock = threading.Lock()
        self.pool: collections.deque[SimEndpoint] = collections.deque()
        self.made = self.removed = self.add_errors = self.del_errors = 0
        self.add_ms: list[float] = []
        self.del_ms: list[float] = []
        self._k = 0
        self._errors = errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cgb-churn-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(180)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self.lock:
                if len(self.pool) >= POOL:
                    self._remove(self.pool.popleft())
                self._make()
            next_at = max(next_at + self.period, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def _make(self) -> None:
        k, self._k = self._k, self._k + 1
        labels = {"app": "cgb-soak-churn", "grp": f"{self.name}g{k % POOL}"}
        started = time.monotonic()
        try:
            ep = self.c.endpoint(self.node, f"{self.name}k{k}", labels)
        except Exception as exc:
            self.add_errors += 1
            self._errors.append(f"CNI ADD on {self.node.name}: {exc}"[:600])
            return
        self.add_ms.append((time.monotonic() - started) * 1000)
        self.made += 1
        self.pool.append(ep)

    def _remove(self, ep: SimEndpoint) -> None:
        started = time.monotonic()
        try:
            self.c.remove_endpoint(ep)
        except Exception as exc:
            self.del_errors += 1
            self._errors.append(f"{exc}"[:600])
            return
        self.del_ms.append((time.monotonic() - started) * 1000)
        self.removed += 1

    def drain(self) -> None:
        with self.lock:
            while self.pool:
                self._remove(self.pool.popleft())


class PolicyChanger:
    """Every POLICY_EVERY s another rule set of the catalogue, on every node through the CLI;
    `apply` (the sampler's way in as well) holds `lock` until every node enforces it."""

    def __init__(
        self,
        c: SoakCluster,
        work: Path,
        expect: Expectations,
        catalogue: list[RuleSet],
        rng: random.Random,
        errors: list[str],
    ) -> None:
        self.c, self.work, self.expect, self.catalogue, self.rng = c, work, expect, catalogue, rng
        self.lock = threading.RLock()
        self.current = catalogue[0]
        self.present: set[str] = set()
        self.changes = self.failed = 0
        self.change_ms: list[float] = []
        self.dirty = False
        self._errors = errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cgb-soak-policy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(120)

    def _loop(self) -> None:
        while not self._stop.wait(POLICY_EVERY):
            self.apply(self.rng.choice([r for r in self.catalogue if r is not self.current]))

    def apply(self, rules: RuleSet) -> bool:
        with self.lock:
            path = self.work / f"policy-{rules.name}.json"
            if not path.exists():
                path.write_text(json.dumps(rules.rules(), indent=1))
            self.expect.begin(rules)
            started = time.monotonic()
            try:
                for node in self.c.nodes:
                    rev = self.c.cli(node, "policy", "import", str(path))["revision"]
                    for label in sorted(self.present - rules.labels()):
                        out = self.c.cli(node, "policy", "delete", "--labels", f"name={label}", check=not self.dirty)
                        rev = out["revision"] if out else rev
                    self._wait(node, rev)
            except Exception as exc:
                self.failed += 1
                self.dirty = True  # the nodes may hold a mix: later probes stay unjudged where it matters
                self.present |= rules.labels()
                self.current = rules
                self._errors.append(f"policy {rules.name}: {exc}"[:600])
                return False
            self.change_ms.append((time.monotonic() - started) * 1000)
            self.changes += 1
            self.present, self.current, self.dirty = rules.labels(), rules, False
            self.expect.settle(rules)
            return True

    def _wait(self, node: SimNode, revision: int) -> None:
        from plugin.client import Client

        Client(node.api_socket, timeout=40).get(f"/v1/policy/wait?revision={revision}&timeout=30")


# -- samples ---------------------------------------------------------------------------------


def _proc(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "rss_anon_kib": int(fields["RssAnon"].split()[0]),
        "rss_file_kib": int(fields["RssFile"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _tree(pid: int) -> dict[str, int]:
    """The process and its descendants, summed (the L7 proxy and its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    pids, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p and c not in pids]
        pids.update(kids)
        frontier.extend(kids)
    total = {"rss_kib": 0, "rss_anon_kib": 0, "rss_file_kib": 0, "threads": 0, "fds": 0, "processes": 0}
    for p in pids:
        with contextlib.suppress(OSError, KeyError):
            for key, value in _proc(p).items():
                total[key] += value
            total["processes"] += 1
    return total


class MapReader:
    """Entry counts of the node's pinned hash and LPM maps, dumped with bpftool in the agent's
    mount namespace (as the cluster tier reads the ipcache)."""

    def __init__(self) -> None:
        self._types: dict[str, str] = {}

    def _bpftool(self, node: SimNode, *args: str) -> Any:
        out = run("nsenter", f"--mount=/proc/{node.pid}/ns/mnt", "bpftool", "-j", *args, timeout=60)
        return json.loads(out.stdout or "null")

    def dump(self, node: SimNode, name: str) -> list[dict[str, Any]]:
        return list(self._bpftool(node, "map", "dump", "pinned", f"{node.bpf_dir}/{name}") or [])

    def count(self, node: SimNode, name: str) -> int:
        return len(self.dump(node, name))

    def ipcache(self, node: SimNode) -> list[str]:
        """The kernel ipcache's prefixes (key: prefixlen incl. 32 bits of family+pad, family, pad, address)."""
        out = []
        for row in self.dump(node, "cg_ipcache"):
            key = bytes(int(b, 16) for b in row["key"])
            family, bits = key[4], int.from_bytes(key[:4], "little") - 32
            addr = ipaddress.ip_address(key[8:12] if family == 4 else key[8:24])
            out.append(f"{addr}/{bits}")
        return sorted(out, key=lambda p: (":" in p, p))

    def counts(self, node: SimNode) -> dict[str, int]:
        out = {}
        for name in sorted(os.listdir(node.bpf_dir)):
            path = f"{node.bpf_dir}/{name}"
            if os.path.isdir(path):
                continue
            if path not in self._types:
                self._types[path] = str(self._bpftool(node, "map", "show", "pinned", path).get("type", ""))
            if self._types[path] in COUNTED_MAP_TYPES:
                out[name] = self.count(node, name)
        return out


def _fd_kinds(pid: int) -> dict[str, int]:
    """The process's descriptors by kind: socket protocol (from its namespace's /proc/net tables;
    unix ones with the path they are bound to, "-" for none, and their state: 01 unconnected or
    listening, 03 connected), anon inode (bpf-map, bpf-prog, eventpoll...), pipe, or file path
    (digits folded); "socket:other" lives in another namespace."""
    protos: dict[str, str] = {}
    for table in ("tcp", "tcp6", "udp", "udp6", "unix", "netlink", "raw", "raw6", "packet"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            column = {"unix": 6, "netlink": 8, "packet": 8}.get(table, 9)
            for line in lines:
                fields = line.split()
                if len(fields) <= column:
                    continue
                if table == "unix":
                    path = "".join("N" if ch.isdigit() else ch for ch in fields[7]) if len(fields) > 7 else "-"
                    protos[fields[column]] = f"unix:{path}:{fields[5]}"
                else:
                    protos[fields[column]] = table
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                kinds["socket:" + protos.get(target[8:-1], "other")] += 1
            elif target.startswith(("pipe:", "anon_inode:")):
                kinds[target.split("[")[0] if target.startswith("pipe:") else target] += 1
            else:
                kinds["".join("N" if ch.isdigit() else ch for ch in target)] += 1
    return dict(sorted(kinds.items()))


def _lines(*cmd: str) -> list[str]:
    return [" ".join(line.split()) for line in run(*cmd, check=False).stdout.splitlines() if line.strip()]


def _pins(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def sample(c: SoakCluster, maps: MapReader, ours: str) -> dict[str, Any]:
    from plugin.client import Client

    nodes: dict[str, Any] = {}
    for node in c.nodes:
        alive = c.agent_alive(node)
        entry: dict[str, Any] = {"alive": alive}
        if alive:
            status = Client(node.api_socket, timeout=30).get("/v1/status")
            entry["agent"] = _proc(node.pid)
            entry["agent_fd_kinds"] = _fd_kinds(node.pid)
            proxy = (status.get("proxy") or {}).get("pid")
            if proxy:
                entry["proxy"] = _tree(int(proxy))
            entry["status"] = {
                "endpoints": status["endpoints"],
                "policy_entries": status["policy"]["entries"],
                "policy_identities": status["policy"]["identities"],
                "policy_rules": status["policy"]["rules"],
            }
            entry["maps"] = maps.counts(node)
            entry["ipcache"] = maps.ipcache(node)
            entry["pins"] = _pins(node.bpf_dir)
        links = [line.split()[1].rstrip(":") for line in _lines("ip", "-n", node.netns, "-o", "link", "show")]
        routes = _lines("ip", "-n", node.netns, "-o", "-4", "route", "show", "table", "all") + _lines(
            "ip", "-n", node.netns, "-o", "-6", "route", "show", "table", "all"
        )
        # without the kernel's link-local local routes: they appear when addrconf is done with a new veth
        routes = [r for r in routes if not r.startswith("local fe80::")]
        entry.update(netns_links=len(links), netns_routes=len(routes), links=links, routes=routes)
        nodes[node.name] = entry
    netns = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()]
    host = {
        "links": len(_lines("ip", "-o", "link", "show")),
        "netns": len(netns),
        "netns_ours": sum(1 for n in netns if n.startswith(ours)),
    }
    return {"nodes": nodes, "host": host, "etcd": _etcd_keys(c)}


def converge(
    c: SoakCluster,
    maps: MapReader,
    expected_ipcache: dict[str, int],
    expected_etcd: dict[str, int] | None,
    timeout: float,
) -> tuple[bool, float]:
    """Wait until every node's kernel ipcache holds the expected number of entries and the etcd
    keys stop moving (or equal `expected_etcd`): the remote state of the last churn step."""
    started = time.monotonic()
    last: dict[str, int] = {}

    def settled() -> bool:
        nonlocal last
        if any(maps.count(n, "cg_ipcache") != expected_ipcache[n.name] for n in c.nodes):
            return False
        keys = _etcd_keys(c)
        same = keys == (expected_etcd if expected_etcd is not None else last)
        last = keys
        return same

    try:
        wait_until(settled, timeout, "the cluster to settle", every=0.5)
    except TimeoutError:
        return False, time.monotonic() - started
    return True, time.monotonic() - started


def _addresses(ep: SimEndpoint) -> int:
    return int(bool(ep.ipv4)) + int(bool(ep.ipv6))


# -- analysis --------------------------------------------------------------------------------


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return 3600 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def _series(samples: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[str, float, float]]]:
    """(owner, metric) → [(sample kind, t, value)] in sample order; owner is a node, 'host' or 'etcd'."""
    out: dict[tuple[str, str], list[tuple[str, float, float]]] = collections.defaultdict(list)
    for s in samples:
        kind, t = s["kind"], s["t"]
        values: dict[tuple[str, str], Any] = {("host", "netns_ours"): s["host"]["netns_ours"]}
        values.update({("etcd", f"keys_{k}"): v for k, v in s["etcd"].items()})
        for name, n in s["nodes"].items():
            for proc in ("agent", "proxy"):
                for key in ("rss_kib", "fds", "threads"):
                    values[(name, f"{proc}_{key}")] = (n.get(proc) or {}).get(key)
            values.update({(name, k): v for k, v in (n.get("maps") or {}).items()})
            values.update({(name, k): v for k, v in (n.get("status") or {}).items()})
            values.update({(name, k): n.get(k) for k in ("pins", "netns_links", "netns_routes")})
        for key, value in values.items():
            if value is not None:
                out[key].append((kind, t, float(value)))
    return out


def tolerance(metric: str, level: float) -> tuple[str, float]:
    if metric.endswith("rss_kib"):
        return "rss", max(RSS_TOLERANCE[0], RSS_TOLERANCE[1] * level)
    if metric.endswith(("_fds", "_threads")):
        return "count", float(COUNT_TOLERANCE)
    if metric in TRAFFIC_MAPS:
        return "traffic", max(TRAFFIC_TOLERANCE[0], TRAFFIC_TOLERANCE[1] * level)
    return "exact", 0.0


def analyse(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per series: first (baseline), the window after warm-up (run samples from WARMUP on), the
    value after the churn; its slope per hour and growth over the window against its tolerance."""
    rows = []
    for (owner, metric), points in sorted(_series(samples).items()):
        window = [(t, v) for kind, t, v in points if kind == "run" and t >= WARMUP]
        if not window:
            continue
        first = next((v for kind, _, v in points if kind == "baseline"), None)
        after = next((v for kind, _, v in points if kind == "after"), None)
        kind, tol = tolerance(metric, window[0][1])
        slope = slope_per_hour(window)
        growth = slope * (window[-1][0] - window[0][0]) / 3600
        spread = max(v for _, v in window) - min(v for _, v in window)
        back = after is None or first is None or after == first
        flat = (spread == 0 and back) if kind == "exact" else growth <= tol
        rows.append(
            {
                "owner": owner,
                "metric": metric,
                "kind": kind,
                "first": first,
                "warm": window[0][1],
                "last": window[-1][1],
                "after": after,
                "spread": spread,
                "slope_per_h": slope,
                "growth": growth,
                "tolerance": tol,
                "flat": flat,
            }
        )
    growing = [r for r in rows if not r["flat"]]
    return {
        "series": rows,
        "verdict": "flat" if not growing else "growing",
        "growing": [f"{r['owner']} {r['metric']}" for r in growing],
    }


# -- the run ---------------------------------------------------------------------------------


def _tree_state() -> dict[str, Any]:
    head = run("git", "-C", str(ROOT), "rev-parse", "HEAD", check=False).stdout.strip()
    dirty = run("git", "-C", str(ROOT), "status", "--porcelain", check=False).stdout.splitlines()
    return {"head": head, "uncommitted": [line[3:] for line in dirty]}


def run_soak(minutes: float = 30.0, seed: int = 0) -> dict[str, Any]:
    seed = seed or int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    catalogue = [reference_rules()] + [random_rules(rng, f"r{k}") for k in range(CATALOGUE)]
    tag = f"b{os.urandom(1).hex()}"
    while (RUN_DIR / f"{tag}.json").exists() or Path(f"/run/netns/cg{tag}ul").exists():  # another cgb… cluster
        tag = f"b{os.urandom(1).hex()}"
    result: dict[str, Any] = {
        "settings": {
            "minutes": minutes,
            "nodes": len(NODES),
            "churn_rate": CHURN_RATE,
            "churn_workers_per_node": CHURN_WORKERS,
            "pool_per_worker": POOL,
            "policy_every_s": POLICY_EVERY,
            "probe_every_s": PROBE_EVERY,
            "probe_timeout_s": PROBE_TIMEOUT,
            "sample_every_s": SAMPLE_EVERY,
            "warmup_s": WARMUP,
            "seed": seed,
            "targets": len(TARGETS),
            "tolerances": {
                "rss_kib": RSS_TOLERANCE,
                "count": COUNT_TOLERANCE,
                "traffic": TRAFFIC_TOLERANCE,
                "traffic_maps": TRAFFIC_MAPS,
                "other": "exact",
            },
        },
        "machine": machine(),
        "tree": _tree_state(),
        "catalogue": {r.name: r.rules() for r in catalogue},
    }
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}soak"))
        cleanup.push(f"work dir {work}", run, "rm", "-rf", str(work), check=False)
        c = SoakCluster(len(NODES), "vxlan", lease_ttl=15, tag=tag)
        ours = f"cg{c.tag}"
        cleanup.push("leftover namespaces", _sweep_netns, f"{ours}e")
        c.up()
        cleanup.push(f"cluster {ours}", c.down)
        log.info("soak: cluster %s up; long-lived endpoints", ours)
        eps: dict[str, SimEndpoint] = {}
        first_add: dict[str, float] = {}
        for i in NODES:
            first_add[c.node(i).name] = time.monotonic()
            eps[f"c{i}"] = c.endpoint(c.node(i), f"c{i}", {"app": "cgb-soak-cli", "cli": f"c{i}"})
            eps[f"s{i}"] = c.endpoint(c.node(i), f"s{i}", {"app": "cgb-soak-srv", "srv": f"s{i}"})
        expect = Expectations(catalogue[0])
        policy = PolicyChanger(c, work, expect, catalogue, rng, errors)
        if not policy.apply(catalogue[0]):
            raise RuntimeError(f"the reference rule set was refused: {errors[-1]}")
        EchoServer(cleanup, [eps[f"s{j}"] for j in NODES], errors)
        _check_rig(eps, catalogue[0])
        maps = MapReader()
        result["gateway_in_ipcache_s"] = _gateways_known(c, maps, first_add)
        base_ipcache = _stable(lambda: {n.name: maps.count(n, "cg_ipcache") for n in c.nodes}, 30)
        started = time.monotonic()
        period = len(NODES) * CHURN_WORKERS / CHURN_RATE
        churn = [Churn(c, c.node(i), w, period, errors) for i in NODES for w in range(CHURN_WORKERS)]
        probes = Probes(eps, expect, started)

        def take(kind: str, expected_etcd: dict[str, int] | None = None, timeout: float = 15) -> dict[str, Any]:
            live = {n.name: [ep for ch in churn if ch.node.name != n.name for ep in ch.pool] for n in c.nodes}
            want = {name: base_ipcache[name] + sum(_addresses(ep) for ep in others) for name, others in live.items()}
            ok, waited = converge(c, maps, want, expected_etcd, timeout)
            s = {
                "kind": kind,
                "t": round(time.monotonic() - started, 1),
                "converged": ok,
                "settle_s": round(waited, 2),
                **sample(c, maps, ours),
                "probes": probes.totals(),
                "churn": {
                    "made": sum(ch.made for ch in churn),
                    "removed": sum(ch.removed for ch in churn),
                    "live": sum(len(ch.pool) for ch in churn),
                },
                "rules": policy.current.name,
            }
            samples.append(s)
            log.info(
                "soak: %s sample at %.0f s (settled %s in %.1f s): probes %s", kind, s["t"], ok, waited, s["probes"]
            )
            return s

        pauses: list[float] = []

        def paused(kind: str) -> None:
            """Sample with the churn between steps and the reference rules in force."""
            t0 = time.monotonic()
            with contextlib.ExitStack() as stack:
                stack.callback(lambda: pauses.append(time.monotonic() - t0))
                for ch in churn:
                    stack.enter_context(ch.lock)
                stack.enter_context(policy.lock)
                if policy.current is not catalogue[0] or policy.dirty:
                    policy.apply(catalogue[0])
                take(kind)

        cleanup.push("probes", probes.stop)
        for ch in churn:
            cleanup.push(f"churn {ch.name}", ch.stop)
        cleanup.push("policy changes", policy.stop)
        baseline = take("baseline")
        probes.start()
        for ch in churn:
            ch.start()
        policy.start()
        end = started + minutes * 60
        next_at = started + SAMPLE_EVERY
        while True:
            at = min(next_at, end)
            while time.monotonic() < at:
                time.sleep(min(1.0, at - time.monotonic()))
            paused("run")
            if at >= end:
                break
            next_at += SAMPLE_EVERY
        run_s = time.monotonic() - started
        policy.stop()
        for ch in churn:
            ch.stop()
        for ch in churn:
            ch.drain()
        with policy.lock:
            if policy.current is not catalogue[0] or policy.dirty:
                policy.apply(catalogue[0])
            take("after", expected_etcd=baseline["etcd"], timeout=60)
        probes.stop()
        result["samples"] = samples
        result["run_s"] = run_s
        result["probes"] = {
            "totals": probes.totals(),
            "by_target": {k: dict(v) for k, v in probes.tally.items()},
            "allowed_ms": summary(probes.latency_ms),
            "failures": probes.failures,
        }
        result["churn"] = {
            "made": sum(ch.made for ch in churn),
            "removed": sum(ch.removed for ch in churn),
            "add_errors": sum(ch.add_errors for ch in churn),
            "del_errors": sum(ch.del_errors for ch in churn),
            "creates_per_s": sum(ch.made for ch in churn) / run_s,
            "paused_s": sum(pauses),
            "creates_per_s_unpaused": sum(ch.made for ch in churn) / max(1.0, run_s - sum(pauses)),
            "cni_add_ms": summary([x for ch in churn for x in ch.add_ms]),
            "cni_del_ms": summary([x for ch in churn for x in ch.del_ms]),
        }
        result["policy"] = {
            "changes": policy.changes,
            "failed": policy.failed,
            "change_ms": summary(policy.change_ms),
            "catalogue": len(catalogue),
        }
        result["agents_alive"] = all(n["alive"] for s in samples for n in s["nodes"].values())
    result["errors"] = errors
    result["analysis"] = analyse(samples)
    t = result["probes"]["totals"]
    result["passed"] = (
        result["analysis"]["verdict"] == "flat"
        and t["allowed_failed"] == 0
        and t["denied_connected"] == 0
        and not errors
        and result["agents_alive"]
        and all(s["converged"] for s in samples)
    )
    return result


def _check_rig(eps: dict[str, SimEndpoint], rules: RuleSet) -> None:
    """Before the soak: under the reference rules every target answers as expected."""
    for t in TARGETS:
        want = rules.allows(t)

        def answers(t: Target = t, want: bool = want) -> bool:
            outcome, handshake, _ = probe(eps[f"c{t.client}"], eps[f"s{t.server}"], t)
            return (outcome == "ok") if want else not handshake

        wait_until(answers, 30, f"{t} to be {'allowed' if want else 'denied'} by the reference rules", every=0.2)


def _gateways_known(c: SoakCluster, maps: MapReader, first_add: dict[str, float]) -> dict[str, float | None]:
    """Seconds from a node's first CNI ADD until its own gateway addresses (the host side of the
    network that ADD created, first address of each range) are in its kernel ipcache; the agent
    finds new host addresses on its sweep (--sweep-interval, 30 s), so the baseline waits for them."""
    out: dict[str, float | None] = {}
    for node in c.nodes:
        want = {f"{ipaddress.ip_network(r)[1]}/{32 if '.' in r else 128}" for r in (node.ipv4_range, node.ipv6_range)}
        try:
            wait_until(
                lambda node=node, want=want: want <= set(maps.ipcache(node)),
                90,
                f"{node.name}'s gateway addresses in its ipcache",
                every=0.5,
            )
            out[node.name] = round(time.monotonic() - first_add[node.name], 1)
        except TimeoutError:
            log.warning("soak: %s's gateway addresses %s never reached its ipcache", node.name, sorted(want))
            out[node.name] = None
    return out


def _stable(read: Callable[[], Any], timeout: float) -> Any:
    """`read()` once two reads half a second apart agree."""
    last: list[Any] = [object()]

    def same() -> bool:
        value = read()
        agree, last[0] = value == last[0], value
        return agree

    wait_until(same, timeout, "counts to settle", every=0.5)
    return last[0]


def _sweep_netns(prefix: str) -> None:
    """Namespaces of churn endpoints whose CNI ADD never returned (the cluster knows no endpoint)."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            run("ip", "netns", "del", name, check=False)


# -- report ----------------------------------------------------------------------------------

SHOWN = (
    ("agent_rss_kib", "agent RSS MiB", 1 / 1024),
    ("proxy_rss_kib", "proxy RSS MiB (all workers)", 1 / 1024),
    ("agent_fds", "agent fds", 1),
    ("agent_threads", "agent threads", 1),
    ("cg_ct", "conntrack entries", 1),
    ("cg_ipcache", "ipcache entries", 1),
    ("cg_policy", "policy entries (LPM)", 1),
    ("cg_policy_exact", "policy entries (exact)", 1),
    ("cg_endpoints", "endpoint entries", 1),
)


def _num(v: float | None, scale: float = 1) -> str:
    if v is None:
        return "-"
    x = v * scale
    return f"{x:.1f}" if scale != 1 else f"{x:.0f}"


def markdown(result: dict[str, Any]) -> str:
    a, p, ch, po = result["analysis"], result["probes"]["totals"], result["churn"], result["policy"]
    st = result["settings"]
    verdict = "**flat**" if a["verdict"] == "flat" else "**growing**: " + ", ".join(a["growing"])
    lines = [
        f"### Soak ({st['minutes']:g} min, {st['nodes']}-node simulated cluster; "
        f"{'passed' if result['passed'] else '**failed**'})",
        "",
        f"Resources: {verdict}. Probes ({st['targets']} cross-node targets, every {st['probe_every_s']:g} s each, "
        f"{st['probe_timeout_s']:g} s timeout): allowed {p['allowed_ok']:,} connected, "
        f"**{p['allowed_failed']} failed** ({p['allowed_slow']} slower than {SLOW_PROBE:g} s); denied "
        f"{p['denied_blocked']:,} blocked, **{p['denied_connected']} connected**; {p['unjudged']:,} not judged "
        "(their verdict changed with a rule set that was being applied).",
        "",
        f"Churn through cellgate-cni: {ch['made']:,} endpoints made and {ch['removed']:,} removed "
        f"({ch['creates_per_s']:.2f} creates/s, {ch['creates_per_s_unpaused']:.2f} outside the {ch['paused_s']:.0f} s "
        f"of sampling pauses; goal {st['churn_rate']:g}), {ch['add_errors']} ADD and "
        f"{ch['del_errors']} DEL errors; CNI ADD p50 {ch['cni_add_ms'].get('median', 0):.0f} ms "
        f"p95 {ch['cni_add_ms'].get('p95', 0):.0f}, DEL p50 {ch['cni_del_ms'].get('median', 0):.0f} ms "
        f"p95 {ch['cni_del_ms'].get('p95', 0):.0f}. Policy: {po['changes']} rule-set changes "
        f"({po['catalogue']} sets), each on every node and enforced in p50 {po['change_ms'].get('median', 0):.0f} ms, "
        f"p95 {po['change_ms'].get('p95', 0):.0f}; {po['failed']} failed.",
        "",
        "| node | metric | first | after warm-up | last | after the churn | slope /h | growth | tolerance |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {(r["owner"], r["metric"]): r for r in a["series"]}
    owners = sorted({r["owner"] for r in a["series"]} - {"host", "etcd"})
    for owner in owners:
        for metric, label, scale in SHOWN:
            r = rows.get((owner, metric))
            if r is None:
                continue
            tol = "exact" if r["kind"] == "exact" else _num(r["tolerance"], scale)
            mark = "" if r["flat"] else " **(growing)**"
            lines.append(
                f"| {owner} | {label}{mark} | {_num(r['first'], scale)} | {_num(r['warm'], scale)} | "
                f"{_num(r['last'], scale)} | {_num(r['after'], scale)} | {_num(r['slope_per_h'], scale)} | "
                f"{_num(r['growth'], scale)} | {tol} |"
            )
    shown = {m for m, _, _ in SHOWN}
    others = [r for r in a["series"] if r["metric"] not in shown]
    moved = [
        f"{r['owner']} {r['metric']} {_num(r['first'])}→{_num(r['last'])}→{_num(r['after'])}"
        for r in others
        if not r["flat"]
    ]
    hosts = [s["host"] for s in result["samples"]]
    lines += [
        "",
        f"{len(others)} other counts (maps, pins, endpoints, identities, rules, node links and routes, our "
        "namespaces, etcd keys by kind) must be the same at every sample and back to their first value at the end: "
        + ("all are." if not moved else "**these moved**: " + "; ".join(moved) + "."),
        f"Host: links {hosts[0]['links']} → {hosts[-1]['links']}, namespaces {hosts[0]['netns']} → "
        f"{hosts[-1]['netns']} (ours {hosts[0]['netns_ours']} → {hosts[-1]['netns_ours']}); "
        "samples with the churn paused and the reference rules in force"
        + ("" if all(s["converged"] for s in result["samples"]) else " (**some never settled**)")
        + ".",
    ]
    gw = result.get("gateway_in_ipcache_s") or {}
    if gw:
        lines.append(
            "A node's own gateway addresses reached its kernel ipcache "
            + ", ".join("never" if v is None else f"{v:g} s" for v in gw.values())
            + " after its first CNI ADD (the agent finds new host addresses on its sweep)."
        )
    fails = result["probes"]["failures"]
    if fails:
        lines += [
            "",
            "First failed probes:",
            "",
            "| t s | target | expected | outcome | ms | rules | since settled s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {f['t']} | {f['target']} | {f['expected']} | {f['outcome']} | {f['ms']} | {f['rules']} | "
            f"{f['since_settled_s']} |"
            for f in fails[:10]
        ]
    if result["errors"]:
        lines += ["", f"{len(result['errors'])} errors, first: `{result['errors'][0][:300]}`"]
    return "\n".join(lines) + "\n"
