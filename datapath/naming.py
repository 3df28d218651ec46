"""Names cellgate gives to kernel objects, all derived from IDs and the instance name.

Deriving instead of remembering is what makes create idempotent and cleanup exact:
the same endpoint always means the same veth, MAC and map keys, and everything we
create carries our prefix plus an alias tag naming the instance that owns it.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15
ENDPOINT_ID = re.compile(r"^[0-9a-f]{16,64}$")
INSTANCE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,11}$")

HOST_PREFIX = "cg"  # + 13 hex characters of the endpoint ID
PEER_PREFIX = "cgp"  # + 12 hex characters; 'p' is not hex, so it never clashes with a host name
RTPROT_CELLGATE = 203  # routes we install carry this protocol number


def check_instance(name: str) -> str:
    if not INSTANCE_NAME.match(name):
        raise ValueError(f"instance name {name!r} must match {INSTANCE_NAME.pattern}")
    return name


def host_ifname(endpoint_id: str) -> str:
    return HOST_PREFIX + endpoint_id[:13]


def peer_ifname(endpoint_id: str) -> str:
    return PEER_PREFIX + endpoint_id[:12]


def host_device(instance: str) -> str:
    """Dummy device that holds gateway addresses and network routes."""
    return "cg_" + instance


def tunnel_device(instance: str) -> str:
    """The instance's VXLAN device ('x' is not hex: never an endpoint's host veth)."""
    return "cgx" + instance


def link_tag(instance: str) -> str:
    """Alias (IFLA_IFALIAS) prefix of every link an instance owns."""
    return f"cellgate:{instance}:"


def link_group(instance: str) -> int:
    """Link group (IFLA_GROUP) of every link an instance creates, set in the creating request.

    The kernel ignores an alias in RTM_NEWLINK, so a link gets its tag only in a second
    request; the group marks it ours from the first one, should we die in between. 30 bits
    of a hash of the name above 2**30: never 0 (the default group) nor a small number an
    operator would pick, and positive where `ip link` prints it as a signed number.
    """
    digest = hashlib.sha256(f"group:{instance}".encode()).digest()
    return 0x40000000 | (int.from_bytes(digest[:4], "big") & 0x3FFFFFFF)


PROXY_TABLE_FIRST, PROXY_TABLES = 2004, 4096  # routing tables 2004..6099: the L7 proxy's, one per instance


def proxy_table(instance: str) -> int:
    """The routing table of an instance's L7 proxy route (`local default dev lo`): its own, so
    that instances sharing a network namespace never remove each other's (the fwmark is shared)."""
    digest = int.from_bytes(hashlib.sha256(f"proxy:{instance}".encode()).digest()[:4], "big")
    return PROXY_TABLE_FIRST + digest % PROXY_TABLES


def vip_metric(instance: str) -> int:
    """The metric of an instance's VIP routes (`unreachable VIP`): its own, so that instances
    sharing a network namespace can each hold one for the same VIP and remove only theirs."""
    digest = int.from_bytes(hashlib.sha256(f"vip:{instance}".encode()).digest()[:4], "big")
    return 0x7C000000 + digest % 0x100000


def netdev_prio(instance: str) -> int:
    """The tc filter priority of an instance's cg_from_netdev on a device it does not own."""
    digest = int.from_bytes(hashlib.sha256(f"netdev:{instance}".encode()).digest()[:4], "big")
    return 100 + digest % 800


def sock_pin_dir(bpf_dir: str) -> str:
    """Where an instance pins its cgroup socket programs (they stay attached across restarts)."""
    return f"{bpf_dir}/progs"


def nat_chain(instance: str) -> str:
    return f"CG-{instance}-NAT"


def forward_chain(instance: str) -> str:
    return f"CG-{instance}-FWD"


def _mac(seed: str) -> str:
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in digest)


def host_mac(endpoint_id: str) -> str:
    return _mac("host:" + endpoint_id)


def container_mac(endpoint_id: str) -> str:
    return _mac("container:" + endpoint_id)


def endpoint_id_for(*parts: str) -> str:
    """Endpoint ID for runtimes that do not give one (CNI: container ID + interface)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cni_network_id(name: str) -> str:
    """Network ID of the CNI network `name`; Docker's IDs are random, so this also tells the two apart."""
    return hashlib.sha256(f"cni:{name}".encode()).hexdigest()
