"""Composition root: build the real adapters, wire them into the Agent, run until signalled.

This is the only place that configures logging, compiles the datapath, opens sockets
and starts threads; importing any other module does none of that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from datapath import cidr, events, plan
from datapath.errors import CellgateError, StateError
from datapath.flows import Names
from datapath.identity import Identities
from datapath.policy import Repository
from ipam.allocator import HostRanges, Ipam
from ipam.store import Journal, JsonDir
from plugin.api.app import create_app as create_api
from plugin.api.context import Tracers
from plugin.cni.install import install as install_cni
from plugin.config import CLUSTER_V4, CLUSTER_V6, Config
from plugin.docker.app import create_app as create_docker
from plugin.docker.watcher import DockerWatcher
from plugin.monitor import EventHub
from plugin.observe.flowlog import FlowLog
from plugin.proxy.supervisor import ProxySupervisor, choose_port, stop_left_over
from plugin.server import TcpServer, UnixServer
from plugin.service import Agent
from plugin.service.cni import CniService
from plugin.service.l7filters import FilterTable
from plugin.service.later import Later
from plugin.service.policy import PolicyState

if TYPE_CHECKING:
    from plugin.kvstore.port import KVStore
    from plugin.service.cluster import ClusterService

log = logging.getLogger("cellgate")


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    noisy = ("werkzeug", "pyroute2", "asyncio", "urllib3", "docker")

    def quiet_libraries(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(noisy)

    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet_libraries)


def lock_state(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the agent's lifetime."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise StateError(f"another agent (pid {pid}) holds {state_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class Runtime:
    """The running agent: its threads, servers and shutdown."""

    def __init__(self, cfg: Config) -> None:
        from datapath.kernel.executor import KernelExecutor
        from datapath.kernel.loader import Datapath
        from datapath.kernel.netns import NetnsOps
        from plugin.service.cluster_identities import ClusterIdentities, IdentityCache

        self.cfg = cfg
        self.stop = threading.Event()
        self.started = time.monotonic()
        # Checked before anything is made: a refused range leaves no state directory or pins behind.
        ranges = HostRanges(cfg.ipv4_range, cfg.ipv6_range, cfg.ipv4_prefix, cfg.ipv6_prefix)
        kvstore = open_kvstore(cfg)  # a clash with a live node is refused here, before anything exists
        self._lock_handle = lock_state(cfg.state_dir)
        # Every document write goes through one journal (one fsync each); what a crash left in it
        # reaches the files before anything reads them.
        self.journal = Journal(cfg.state_dir)
        self.journal.replay()
        self.datapath = Datapath(cfg.bpf_dir)
        self.kernel = KernelExecutor(cfg.name, self.datapath)
        self.ipam = Ipam(self._docs("ipam"), ranges)
        settings = plan.Settings(cfg.name, cfg.masquerade, self.datapath.revision)
        if kvstore is not None:  # cluster traffic is never masqueraded
            settings = dataclasses.replace(settings, cluster_cidrs=cluster_cidrs(cfg))
        proxy_state = cfg.state_dir / "proxy"
        proxy_port = choose_port(proxy_state, cfg.proxy_port) if cfg.proxy else 0
        settings = dataclasses.replace(settings, proxy=cfg.proxy, lb_devices=lb_devices(cfg),
                                       cgroup=socket_lb_cgroup(cfg, self.datapath.pins_private))
        self.kernel.config.lb_flows = bool(settings.lb_devices) or kvstore is not None
        identities: Identities = (ClusterIdentities(self._docs("identities"), IdentityCache())
                                  if kvstore is not None else Identities(self._docs("identities")))
        policy = PolicyState(identities, Repository(self._docs("policy")), self.kernel, cfg.enforcement,
                             cidr.CidrIdentities(self._docs("cidr-identities")),
                             FilterTable(cfg.state_dir / "proxy" / "filters.json"))
        self.agent = Agent(
            self._docs("networks"), self._docs("endpoints"),
            self.ipam, self.kernel, settings, policy=policy, services=self._docs("services"),
        )
        self.later = Later()  # a Docker endpoint's veth is deleted after the reply
        self.agent.run_later = self.later
        self.kernel.set_config(False, self.agent.timeouts, verdicts=False)  # until a monitor asks
        self.kernel.config.set_proxy_port(proxy_port)  # 0 without a proxy: L7 flows drop
        self.cluster: ClusterService | None = None
        if kvstore is not None:
            from datapath.nodes import Node
            from plugin.service.cluster import ClusterService, ClusterSettings

            assert isinstance(identities, ClusterIdentities) and cfg.node_address is not None
            node = Node(cfg.node_name, cfg.node_address, cfg.ipv4_range, cfg.ipv6_range)
            self.cluster = ClusterService(self.agent, kvstore, ClusterSettings(
                node, cfg.tunnel, cfg.lease_ttl, cfg.state_dir / "cluster"), identities)
            self.agent.cluster_view = self.cluster.cached_view()
        self.restore = self.agent.restore()
        if self.cluster is not None:
            self.cluster.start()
        self.watcher = DockerWatcher(self.agent, cfg.docker_host, cfg.docker_resync, cfg.driver_name)
        self.agent.reconcile_grace = cfg.reconcile_grace
        self.agent.runtime_view = self.watcher.view  # what `ipam check` judges Docker's state by
        if cfg.cni_bin_dir:
            try:
                path, changed = install_cni(Path(cfg.cni_bin_dir))
                if changed:
                    log.info("installed the CNI plugin at %s", path)
            except (OSError, CellgateError) as exc:
                log.warning("cannot install the CNI plugin in %s: %s", cfg.cni_bin_dir, exc)
        self.hub = EventHub()
        node = cfg.node_name or socket.gethostname()  # flows name their node on a single host too
        self.flows = FlowLog(cfg.flow_ring_size, lambda: Names(node, self.agent.service_names(),
                                                                self.agent.endpoint_addresses()))
        self.proxy: ProxySupervisor | None = None
        if cfg.proxy:
            self.proxy = ProxySupervisor(proxy_state, cfg.bpf_dir, proxy_port, cfg.access_log, self._l7_event,
                                         cfg.debug, cfg.proxy_workers)
            self.proxy.start()
        self._ifnames: dict[int, str] = {}
        self.servers: list[UnixServer | TcpServer] = []
        try:
            self.servers.append(UnixServer(cfg.plugin_socket, create_docker(self.agent), "docker plugin"))
            verdicts = Tracers(self.agent.set_verdicts)  # one switch for followers and open map pages
            if cfg.record_allowed_flows:
                verdicts.start()  # and never stopped
            api = create_api(self.agent, self.hub, self.info, CniService(self.agent, NetnsOps()), self.cluster,
                             self.flows, verdicts)
            self.servers.append(UnixServer(cfg.api_socket, api, "API"))
            if cfg.http_serve is not None:
                from plugin.observe.metrics import exposition
                from plugin.observe.web import create_web

                metrics = exposition(self.agent, self.flows, lambda: getattr(kvstore, "telemetry", None))
                web = create_web(metrics, self.flows, lambda: verdicts.hold(MAP_VIEWER_SECONDS))
                self.servers.append(TcpServer(*cfg.http_serve, web, "metrics and map"))
        except CellgateError:
            for server in self.servers:
                server.stop()
            raise
        self.ready_seconds = time.monotonic() - self.started

    def _docs(self, name: str) -> JsonDir:
        """One of the state directory's document directories, written through the journal."""
        return JsonDir(self.cfg.state_dir / name, self.journal)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "plugin_socket": str(self.cfg.plugin_socket),
            "api_socket": str(self.cfg.api_socket),
            "state_dir": str(self.cfg.state_dir),
            "bpf_dir": str(self.cfg.bpf_dir),
            "compile_ms": round(self.datapath.compile_seconds * 1000, 1),
            "datapath_reused": self.datapath.reused,  # the pinned programs of this revision, no compile
            "proxy": ({"port": self.proxy.port, "pid": self.proxy.pid, "listening": self.proxy.listening()}
                      if self.proxy is not None else None),
            "start_ms": round(self.ready_seconds * 1000, 1),
            "docker": {"host": self.cfg.docker_host, "following": self.watcher.connected,
                       "last_sync": self.watcher.last_sync},
            "restore": {
                "endpoints": self.restore.endpoints,
                "removed_endpoints": self.restore.removed_endpoints,
                "released": self.restore.released,
                "changes": self.restore.changes,
            },
        }

    # -- threads ----------------------------------------------------------------------------

    def _endpoint_for(self, ifindex: int) -> str:
        name = self._ifnames.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                name = ""
            if len(self._ifnames) > 65536:
                self._ifnames.clear()
            self._ifnames[ifindex] = name
        return self.agent.endpoint_on(name) if name else ""

    def _read_events(self) -> None:
        offset = events.boot_offset()

        def sink(raw: bytes) -> None:
            try:
                ev = events.decode(raw, offset)
            except ValueError as exc:
                log.warning("bad event record: %s", exc)
                return
            ev["endpoint"] = self._endpoint_for(ev["ifindex"])
            for side in ("src", "dst"):
                number = ev.get(f"{side}_identity")
                if number:
                    ev[f"{side}_labels"] = self.agent.labels_of(number)
            self.flows.add_datapath(raw, ev)
            self.hub.publish(ev)

        while not self.stop.is_set():
            try:
                self.datapath.poll_events(sink, 200)
            except Exception:  # keep reading; one bad callback must not end the monitor
                log.exception("event reader")
                self.stop.wait(1.0)

    def _l7_event(self, ev: dict[str, Any]) -> None:
        """An event of the L7 proxy, with the labels of its identities."""
        for side in ("src", "dst"):
            number = ev.get(f"{side}_identity")
            if isinstance(number, int) and number:
                ev[f"{side}_labels"] = self.agent.labels_of(number)
        self.flows.add_l7(ev)
        self.hub.publish(ev)

    def _sweep(self) -> None:
        while not self.stop.wait(self.cfg.sweep_interval):
            try:
                self.agent.sweep()
            except CellgateError as exc:
                log.warning("sweep failed: %s", exc)

    def serve(self) -> int:
        threads = [
            threading.Thread(target=self._read_events, name="events", daemon=True),
            threading.Thread(target=self._sweep, name="sweep", daemon=True),
            threading.Thread(target=self.watcher.run, args=(self.stop,), name="docker", daemon=True),
        ]
        if self.cluster is not None:
            threads += self.cluster.threads(self.stop)
        for t in threads:
            t.start()
        settle_heap()
        for server in self.servers:
            server.start()
        log.info("agent %s ready in %.0f ms (datapath %s, %d endpoints)", self.cfg.name,
                 self.ready_seconds * 1000, self.datapath.revision, self.agent.endpoint_count())
        self.stop.wait()
        log.info("agent %s stopping", self.cfg.name)
        for server in self.servers:
            server.stop()
        self.watcher.stop()
        self.later.stop(timeout=5.0)  # the veths of endpoints removed just before
        deadline = time.monotonic() + 1.0
        for t in threads[:2]:  # the Docker watcher may sit in a blocking read; it is a daemon thread
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.cluster is not None:
            self.cluster.close()
        if self.proxy is not None:
            self.proxy.stop()
        self.kernel.close()
        self.datapath.close()
        self.journal.close()
        return 0


def socket_lb_cgroup(cfg: Config, pins_private: str = "") -> str:
    """The cgroup2 directory of the socket balancer, or "" (off, or no cgroup2 on this host).

    Programs on the cgroup2 root are shared by the whole host and stay attached after the agent
    exits; with pins private to the agent (`pins_private` says why) nothing could find and detach
    them again, so socket-level balancing is then off ('auto') or refused (a directory given)."""
    from datapath.kernel.cgroup import ensure_cgroup2

    if not cfg.socket_lb:
        return ""
    if pins_private:
        if cfg.socket_lb == "auto":
            log.warning("no socket-level balancing (services are balanced only for packets): %s", pins_private)
            return ""
        raise StateError(f"--socket-lb {cfg.socket_lb}: the socket programs could not be detached again: "
                         f"{pins_private}")
    if cfg.socket_lb == "auto":
        found = ensure_cgroup2()
        if not found:
            log.warning("no cgroup2 mount: services are balanced only for packets (no socket-level balancing)")
        return found
    if not Path(cfg.socket_lb, "cgroup.procs").is_file():
        raise StateError(f"--socket-lb {cfg.socket_lb}: not a cgroup2 directory")
    return cfg.socket_lb


def lb_devices(cfg: Config) -> tuple[str, ...]:
    """The devices cg_from_netdev runs on; refuses a device that does not exist."""
    if cfg.lb_devices == "none":
        return ()
    if cfg.lb_devices == "auto":
        if not cfg.clustered or cfg.node_address is None:
            return ()
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_addr(family=socket.AF_INET):
                if msg.get_attr("IFA_ADDRESS") == str(cfg.node_address):
                    return (socket.if_indextoname(msg["index"]),)
        log.warning("no device holds the node address %s: no packet-level balancing", cfg.node_address)
        return ()
    names = tuple(cfg.lb_devices.split(","))
    for name in names:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise StateError(f"--lb-devices: no device {name}") from None
    return names


def open_kvstore(cfg: Config) -> KVStore | None:
    """The cluster's store, when one is configured, after checking that this node may join: a live
    node with this name (another agent) or an overlapping range refuses the start. A store that does
    not answer is no refusal: the agent starts from its cached state and registers later."""
    if not cfg.clustered:
        return None
    from datapath.nodes import Node
    from plugin.kvstore.etcd import EtcdStore
    from plugin.kvstore.port import KvstoreError
    from plugin.service.cluster import check_registration, node_uid
    from plugin.service.cluster_keys import NodeRecord

    assert cfg.node_address is not None
    store = EtcdStore(cfg.kvstore_endpoints, cfg.kvstore_timeout)
    node = Node(cfg.node_name, cfg.node_address, cfg.ipv4_range, cfg.ipv6_range)
    record = NodeRecord(node, node_uid(cfg.state_dir / "cluster", create=False), cfg.tunnel)
    try:
        check_registration(store, record)
        refresh_saved_lease(store, cfg.state_dir / "cluster" / "lease")  # before the datapath compiles
    except KvstoreError as exc:
        log.warning("kvstore %s unavailable at start: %s", ",".join(cfg.kvstore_endpoints), exc)
    except CellgateError:
        store.close()
        raise
    return store


def refresh_saved_lease(store: KVStore, path: Path) -> None:
    """Keep the previous run's lease alive at once: a restart within the TTL keeps its keys."""
    from plugin.kvstore.port import LeaseNotFound

    try:
        lease = int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return
    with contextlib.suppress(LeaseNotFound):
        store.keepalive(lease)


def cluster_cidrs(cfg: Config) -> tuple[plan.IPNetwork, ...]:
    """Destinations that are never masqueraded: the cluster's ranges, and this node's if outside."""
    out: list[plan.IPNetwork] = [CLUSTER_V4, CLUSTER_V6]
    for rng in (cfg.ipv4_range, cfg.ipv6_range):
        if not any(rng.subnet_of(c) for c in out if c.version == rng.version):  # type: ignore[arg-type]
            out.append(rng)
    return tuple(out)


# Objects allocated between two young-generation collections (CPython's default is 700).
# Requests allocate in bursts (a 1k-rule import makes ~200k objects that die or live on
# together); at 700 each burst promoted enough half-built objects to trigger full collections,
# which took 40 ms each on the agent's heap: half of all 1k-rule imports paid one. At 10k a
# request's temporaries mostly die before a collection sees them. The cost is up to 10k young
# objects (pyroute2's message cycles among them) waiting for collection: about 5 MB at most.
MAP_VIEWER_SECONDS = 10.0  # allowed flows stay reported this long after a map page's last refresh
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect what start left behind and space young collections for request bursts."""
    gc.collect()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_agent(cfg: Config) -> int:
    configure_logging(cfg.debug)
    try:
        runtime = Runtime(cfg)
    except CellgateError as exc:
        log.error("cannot start: %s", exc)
        return 1

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        runtime.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return runtime.serve()


def cleanup(cfg: Config) -> dict[str, Any]:
    """Remove everything this instance created on the host, and nothing else.

    Refuses while an agent holds the state directory. Containers still attached lose
    their network: their veths are deleted.
    """
    from datapath.kernel.cgroup import detach_pinned, ensure_cgroup2
    from datapath.kernel.executor import KernelExecutor
    from datapath.kernel.loader import remove_pins

    report: dict[str, Any] = {"links": [], "routes": [], "iptables": False, "pins": [], "sockets": [], "state": "",
                              "proxy": 0, "socket_programs": []}
    if cfg.state_dir.is_dir():
        handle = lock_state(cfg.state_dir)  # raises StateError while an agent runs
        handle.close()
        report["proxy"] = stop_left_over(cfg.state_dir / "proxy")
    kernel = KernelExecutor(cfg.name, None)
    try:
        owned = kernel.observe()
        links = [o for o in owned if isinstance(o, (plan.Veth, plan.HostDevice, plan.TunnelDevice))]
        routes = [o for o in owned if isinstance(o, (plan.Route, plan.ProxyRoute, plan.VipRoute))]
        kernel.apply(plan.Plan(remove=tuple(routes) + tuple(links)))
        report["links"] = sorted(o.name for o in links)
        report["routes"] = sorted(str(o.dst) if isinstance(o, plan.Route) else
                                  f"proxy-ipv{o.family}" if isinstance(o, plan.ProxyRoute) else f"vip {o.address}"
                                  for o in routes)
        report["iptables"] = kernel.iptables.teardown()
    finally:
        kernel.close()
    cgroup = cfg.socket_lb if cfg.socket_lb not in ("", "auto", "off") else ensure_cgroup2()
    report["socket_programs"] = detach_pinned(cfg.bpf_dir, cgroup)
    report["pins"] = remove_pins(cfg.bpf_dir)
    for path in (cfg.plugin_socket, cfg.api_socket):
        if path.is_socket():
            path.unlink()
            report["sockets"].append(str(path))
    if cfg.api_socket.parent.name == cfg.name:
        with contextlib.suppress(OSError):
            cfg.api_socket.parent.rmdir()
    if cfg.state_dir.is_dir():
        shutil.rmtree(cfg.state_dir)
        report["state"] = str(cfg.state_dir)
    return report
