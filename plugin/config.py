"""Agent configuration: every path and range is a flag with an environment variable behind it.

Defaults derive from the instance name, so `--name cgt1` gives a fully separate agent
(its own sockets, state, pins, links and iptables chains) for tests or side-by-side runs.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from datapath import naming

CLUSTER_V4 = ipaddress.IPv4Network("10.192.0.0/10")
CLUSTER_V6 = ipaddress.IPv6Network("fd63:6767::/48")
NODE_V4_PREFIX = 20  # 4094 addresses per host, 1024 hosts in the cluster range
NODE_V6_PREFIX = 64


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def machine_index() -> int:
    """A stable number for this host, from /etc/machine-id (or the hostname)."""
    try:
        seed = Path("/etc/machine-id").read_text().strip()
    except OSError:
        seed = ""
    seed = seed or os.uname().nodename
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big")


def default_ranges(node_index: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    v4 = list(CLUSTER_V4.subnets(new_prefix=NODE_V4_PREFIX))
    v6_base = int(CLUSTER_V6.network_address) + ((node_index % (1 << 16)) << 64)
    return v4[node_index % len(v4)], ipaddress.IPv6Network((v6_base, NODE_V6_PREFIX))


@dataclass(frozen=True)
class Config:
    name: str
    plugin_socket: Path
    api_socket: Path
    state_dir: Path
    bpf_dir: Path
    ipv4_range: ipaddress.IPv4Network
    ipv6_range: ipaddress.IPv6Network
    ipv4_prefix: int
    ipv6_prefix: int
    masquerade: bool
    debug: bool
    sweep_interval: float
    enforcement: str = "default"
    docker_host: str = "unix:///var/run/docker.sock"
    docker_resync: float = 60.0
    cni_bin_dir: str = "/opt/cni/bin"
    reconcile_grace: float = 60.0
    driver_name: str = ""  # empty: the instance name
    # Multi-host (docs/cluster.md): all empty/None without a kvstore, and the agent is single-host.
    kvstore: str = ""  # "" | "etcd"
    kvstore_endpoints: tuple[str, ...] = ()
    node_name: str = ""
    node_address: ipaddress.IPv4Address | None = None
    tunnel: str = ""  # "vxlan" | "disabled" ("" without a kvstore)
    lease_ttl: int = 15
    kvstore_timeout: float = 2.0
    # L7 proxy (docs/l7.md): its listener port on 127.0.0.1/::1 (0: chosen once, kept in the state
    # dir), an optional JSON-lines access log, and whether it runs at all.
    proxy_port: int = 0
    access_log: str = ""
    proxy: bool = True
    proxy_workers: int = 0  # event loops (processes) of the proxy; 0: one per CPU, at most 4
    flow_ring_size: int = 16384  # recent flows kept for `cellgate observe` (about 300 bytes each)
    http_serve: tuple[str, int] | None = None  # the opt-in HTTP listener of /metrics and /map
    record_allowed_flows: bool = False  # verdict events of allowed new flows always, not only on demand
    # Services (docs/services.md): the cgroup2 directory the socket balancer attaches to
    # ("auto": the cgroup2 mount; "": no socket-level balancing).
    socket_lb: str = "auto"
    # the node's devices where packets for VIPs are balanced ("auto": in a cluster, the device
    # holding --node-address; "none"; or a comma list)
    lb_devices: str = "auto"

    @property
    def clustered(self) -> bool:
        return bool(self.kvstore)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default=_env("CELLGATE_NAME", "cellgate"),
                            help="instance and Docker driver name [CELLGATE_NAME, default cellgate]")
        parser.add_argument("--driver-name", default=_env("CELLGATE_DRIVER_NAME", ""),
                            help="the driver name Docker uses, when not NAME (a managed plugin: NAME:latest) "
                                 "[CELLGATE_DRIVER_NAME]")
        parser.add_argument("--plugin-socket", default=_env("CELLGATE_PLUGIN_SOCKET", ""),
                            help="Docker plugin socket [CELLGATE_PLUGIN_SOCKET, "
                                 "default /run/docker/plugins/NAME.sock]")
        parser.add_argument("--state-dir", default=_env("CELLGATE_STATE_DIR", ""),
                            help="persistent state [CELLGATE_STATE_DIR, default /var/lib/NAME]")
        parser.add_argument("--bpf-dir", default=_env("CELLGATE_BPF_DIR", ""),
                            help="pinned BPF maps [CELLGATE_BPF_DIR, default /sys/fs/bpf/NAME]")
        parser.add_argument("--node-index", type=int, default=int(_env("CELLGATE_NODE_INDEX", "-1")),
                            help="this host's slot in the cluster ranges [CELLGATE_NODE_INDEX, "
                                 "default from /etc/machine-id]")
        parser.add_argument("--ipv4-range", default=_env("CELLGATE_IPV4_RANGE", ""),
                            help="IPv4 range this host allocates from [CELLGATE_IPV4_RANGE, "
                                 "default a /20 of 10.192.0.0/10]")
        parser.add_argument("--ipv6-range", default=_env("CELLGATE_IPV6_RANGE", ""),
                            help="IPv6 range this host allocates from [CELLGATE_IPV6_RANGE, "
                                 "default a /64 of fd63:6767::/48]")
        parser.add_argument("--ipv4-network-size", type=int, default=int(_env("CELLGATE_IPV4_NETWORK_SIZE", "24")),
                            help="prefix length of a network drawn from the range [default 24]")
        parser.add_argument("--ipv6-network-size", type=int, default=int(_env("CELLGATE_IPV6_NETWORK_SIZE", "80")),
                            help="prefix length of an IPv6 network drawn from the range [default 80]")
        parser.add_argument("--masquerade", type=_flag, default=_flag(_env("CELLGATE_MASQUERADE", "true")),
                            help="masquerade IPv4 traffic leaving the host [CELLGATE_MASQUERADE, default true]")
        parser.add_argument("--sweep-interval", type=float, default=float(_env("CELLGATE_SWEEP_INTERVAL", "30")),
                            help="seconds between checks for endpoints whose container vanished [default 30]")
        parser.add_argument("--enforcement", choices=("default", "always", "never"),
                            default=_env("CELLGATE_ENFORCEMENT", "default"),
                            help="policy enforcement mode [CELLGATE_ENFORCEMENT, default: default]")
        parser.add_argument("--docker-host", default=_env("DOCKER_HOST", "unix:///var/run/docker.sock"),
                            help="where to learn container labels [DOCKER_HOST, default unix:///var/run/docker.sock]")
        parser.add_argument("--docker-resync", type=float, default=float(_env("CELLGATE_DOCKER_RESYNC", "60")),
                            help="seconds between full label resyncs with Docker [default 60]")
        parser.add_argument("--reconcile-grace", type=_seconds,
                            default=_seconds(_env("CELLGATE_RECONCILE_GRACE", "60")),
                            help="seconds Docker may be silent about a network, endpoint or address we "
                                 "hold before reconciliation removes it [CELLGATE_RECONCILE_GRACE, default 60]")
        parser.add_argument("--cni-bin-dir", default=_env("CELLGATE_CNI_BIN_DIR", "/opt/cni/bin"),
                            help="install/update the cellgate-cni plugin here at start ('' = don't) "
                                 "[CELLGATE_CNI_BIN_DIR, default /opt/cni/bin]")
        parser.add_argument("--kvstore", choices=("", "etcd"), default=_env("CELLGATE_KVSTORE", ""),
                            help="share identities, nodes and the ipcache through this store; empty = "
                                 "single host [CELLGATE_KVSTORE]")
        parser.add_argument("--kvstore-endpoints", default=_env("CELLGATE_KVSTORE_ENDPOINTS", ""),
                            help="comma-separated etcd client URLs, http://IP:2379 [CELLGATE_KVSTORE_ENDPOINTS]")
        parser.add_argument("--node-name", default=_env("CELLGATE_NODE_NAME", ""),
                            help="this node's name in the cluster [CELLGATE_NODE_NAME, default the hostname]")
        parser.add_argument("--node-address", default=_env("CELLGATE_NODE_ADDRESS", ""),
                            help="the IPv4 address other nodes reach this one at (tunnel endpoint, next hop) "
                                 "[CELLGATE_NODE_ADDRESS]")
        parser.add_argument("--tunnel", choices=("", "vxlan", "disabled"), default=_env("CELLGATE_TUNNEL", ""),
                            help="vxlan: overlay carrying the identity; disabled: native routing "
                                 "[CELLGATE_TUNNEL, default vxlan with a kvstore]")
        parser.add_argument("--lease-ttl", type=int, default=int(_env("CELLGATE_LEASE_TTL", "15")),
                            help="seconds a dead node's keys outlive it in the kvstore [CELLGATE_LEASE_TTL, "
                                 "default 15]")
        parser.add_argument("--proxy-port", type=int, default=int(_env("CELLGATE_PROXY_PORT", "0")),
                            help="the L7 proxy's listener port on 127.0.0.1 and ::1 [CELLGATE_PROXY_PORT, "
                                 "default: chosen at first start and kept]")
        parser.add_argument("--access-log", default=_env("CELLGATE_ACCESS_LOG", ""),
                            help="append every L7 request and verdict to this file as JSON lines "
                                 "[CELLGATE_ACCESS_LOG]")
        parser.add_argument("--proxy-workers", type=int, default=int(_env("CELLGATE_PROXY_WORKERS", "0")),
                            help="processes of the L7 proxy, each an event loop on the port (SO_REUSEPORT; "
                                 "Linux 6.5+ for more than one) [CELLGATE_PROXY_WORKERS, default one per CPU, "
                                 "at most 4]")
        parser.add_argument("--no-proxy", dest="proxy", action="store_false",
                            default=not _flag(_env("CELLGATE_NO_PROXY", "false")),
                            help="do not run the L7 proxy: flows that L7 rules cover are dropped "
                                 "[CELLGATE_NO_PROXY]")
        parser.add_argument("--socket-lb", default=_env("CELLGATE_SOCKET_LB", "auto"), metavar="CGROUP2_DIR",
                            help="cgroup2 directory whose processes' connect()/sendmsg() to a service VIP are "
                                 "balanced ('auto': the cgroup2 mount, /sys/fs/cgroup/unified on hybrid hosts; "
                                 "'off': none) [CELLGATE_SOCKET_LB]")
        parser.add_argument("--lb-devices", default=_env("CELLGATE_LB_DEVICES", "auto"), metavar="DEV[,DEV]",
                            help="devices on which packets for service VIPs from outside are balanced, with direct "
                                 "server return to other nodes' backends ('auto': in a cluster, the device of "
                                 "--node-address; 'none') [CELLGATE_LB_DEVICES]")
        parser.add_argument("--flow-ring-size", type=int, default=int(_env("CELLGATE_FLOW_RING_SIZE", "16384")),
                            help="recent flows the agent keeps for `cellgate observe` (about 300 bytes each; "
                                 "totals stay exact past it) [CELLGATE_FLOW_RING_SIZE, default 16384]")
        parser.add_argument("--http-serve-addr", default=_env("CELLGATE_HTTP_SERVE_ADDR", ""), metavar="ADDR:PORT",
                            help="serve Prometheus metrics (/metrics) and the service map (/map) over HTTP here, "
                                 "e.g. 127.0.0.1:9962 (off by default; a non-loopback address needs "
                                 "--http-serve-public) [CELLGATE_HTTP_SERVE_ADDR]")
        parser.add_argument("--record-allowed-flows", action="store_true",
                            default=_flag(_env("CELLGATE_RECORD_ALLOWED_FLOWS", "false")),
                            help="report every allowed new flow to the flow log, not only while someone follows "
                                 "(`policy suggest` and `--dry-run` then see them; costs one event per new "
                                 "connection) [CELLGATE_RECORD_ALLOWED_FLOWS]")
        parser.add_argument("--http-serve-public", action="store_true",
                            default=_flag(_env("CELLGATE_HTTP_SERVE_PUBLIC", "false")),
                            help="allow --http-serve-addr on a non-loopback address: anyone who reaches it "
                                 "reads the metrics, flows and labels [CELLGATE_HTTP_SERVE_PUBLIC]")
        parser.add_argument("--debug", action="store_true", default=_flag(_env("CELLGATE_DEBUG", "false")),
                            help="log wire bodies and kernel changes [CELLGATE_DEBUG]")

    @classmethod
    def from_args(cls, args: argparse.Namespace, api_socket: str = "") -> Config:
        name = naming.check_instance(args.name)
        index = args.node_index if args.node_index >= 0 else machine_index()
        v4_default, v6_default = default_ranges(index)
        try:
            v4 = ipaddress.IPv4Network(args.ipv4_range) if args.ipv4_range else v4_default
            v6 = ipaddress.IPv6Network(args.ipv6_range) if args.ipv6_range else v6_default
        except ValueError as exc:
            raise ValueError(f"bad address range: {exc}") from None
        cluster = _cluster_args(args)
        return cls(
            name=name,
            plugin_socket=Path(args.plugin_socket or f"/run/docker/plugins/{name}.sock"),
            api_socket=Path(api_socket or default_api_socket(name)),
            state_dir=Path(args.state_dir or f"/var/lib/{name}"),
            bpf_dir=Path(args.bpf_dir or f"/sys/fs/bpf/{name}"),
            ipv4_range=v4,
            ipv6_range=v6,
            ipv4_prefix=args.ipv4_network_size,
            ipv6_prefix=args.ipv6_network_size,
            masquerade=args.masquerade,
            debug=args.debug,
            sweep_interval=args.sweep_interval,
            enforcement=args.enforcement,
            docker_host=args.docker_host,
            docker_resync=args.docker_resync,
            cni_bin_dir=args.cni_bin_dir,
            reconcile_grace=args.reconcile_grace,
            driver_name=args.driver_name,
            proxy_port=_proxy_port(getattr(args, "proxy_port", 0)),
            access_log=getattr(args, "access_log", "") or "",
            proxy=getattr(args, "proxy", True),
            proxy_workers=_proxy_workers(getattr(args, "proxy_workers", 0)),
            socket_lb=_socket_lb(getattr(args, "socket_lb", "auto")),
            lb_devices=_lb_devices(getattr(args, "lb_devices", "auto")),
            flow_ring_size=_flow_ring_size(getattr(args, "flow_ring_size", 16384)),
            record_allowed_flows=getattr(args, "record_allowed_flows", False),
            http_serve=_http_serve(getattr(args, "http_serve_addr", ""), getattr(args, "http_serve_public", False)),
            **cluster,
        )


def _cluster_args(args: argparse.Namespace) -> dict[str, object]:
    """The multi-host settings, checked together: a kvstore needs endpoints and a node address."""
    kvstore = getattr(args, "kvstore", "") or ""
    endpoints = tuple(e.strip() for e in (getattr(args, "kvstore_endpoints", "") or "").split(",") if e.strip())
    tunnel = getattr(args, "tunnel", "") or ""
    address_text = getattr(args, "node_address", "") or ""
    ttl = getattr(args, "lease_ttl", 15)
    if not kvstore:
        if endpoints or tunnel or address_text:
            raise ValueError("--kvstore-endpoints, --tunnel and --node-address need --kvstore etcd")
        return {}
    if not endpoints:
        raise ValueError("--kvstore etcd needs --kvstore-endpoints http://IP:2379[,...]")
    for url in endpoints:
        if not re.fullmatch(r"http://[^/\s:]+:\d{1,5}/?", url):
            raise ValueError(f"kvstore endpoint {url!r} is not http://HOST:PORT (TLS is not supported yet)")
    if not address_text:
        raise ValueError("--kvstore needs --node-address, the IPv4 address other nodes reach this one at")
    try:
        address = ipaddress.IPv4Address(address_text)
    except ValueError:
        raise ValueError(f"--node-address {address_text!r} is not an IPv4 address") from None
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise ValueError(f"--node-address {address} cannot be reached by other nodes")
    node_name = getattr(args, "node_name", "") or os.uname().nodename
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node_name):
        raise ValueError(f"--node-name {node_name!r}: use 1-63 letters, digits, '.', '_' or '-'")
    if not 2 <= ttl <= 3600:
        raise ValueError(f"--lease-ttl {ttl}: give 2 to 3600 seconds")
    return {"kvstore": kvstore, "kvstore_endpoints": endpoints, "node_name": node_name, "node_address": address,
            "tunnel": tunnel or "vxlan", "lease_ttl": ttl}


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _lb_devices(value: str) -> str:
    value = value.strip()
    if value in ("auto", "none", ""):
        return value or "none"
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if len(name) > 15 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"--lb-devices: {name!r} is not a device name")
    return ",".join(names)


def _socket_lb(value: str) -> str:
    if value in ("auto", "off", ""):
        return "" if value in ("off", "") else "auto"
    if not value.startswith("/"):
        raise ValueError(f"--socket-lb {value!r}: give 'auto', 'off' or an absolute cgroup2 directory")
    return value


def _proxy_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"--proxy-port {port}: must be between 1 and 65535 (0: chosen)")
    return port


def _http_serve(text: str, public: bool) -> tuple[str, int] | None:
    """ADDR:PORT ([v6]:PORT) of the HTTP listener; a non-loopback address only with `public`."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--http-serve-addr {text!r}: give an IP address and a port, e.g. 127.0.0.1:9962") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http-serve-addr {text!r}: the port must be 1-65535")
    if not address.is_loopback and not public:
        raise ValueError(f"--http-serve-addr {text!r}: {address} is not a loopback address; anyone who reaches "
                         "it would read metrics, flows and labels: pass --http-serve-public to mean it")
    return str(address), int(port)


def _flow_ring_size(n: int) -> int:
    if not 1 <= n <= 1 << 20:
        raise ValueError(f"--flow-ring-size {n}: give 1..1048576")
    return n


def _proxy_workers(n: int) -> int:
    if not 0 <= n <= 64:
        raise ValueError(f"--proxy-workers {n}: must be between 1 and 64 (0: one per CPU)")
    return n or min(os.cpu_count() or 1, 4)


def default_api_socket(name: str = "") -> str:
    name = name or os.environ.get("CELLGATE_NAME", "cellgate")
    return os.environ.get("CELLGATE_SOCK") or f"/var/run/{name}/{name}.sock"
