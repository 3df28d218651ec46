"""The cluster use cases against the in-memory kvstore and fake kernels: two or three nodes share
one store; each runs the real list-watch loops and reconciler threads.

The same service runs against a real etcd in tests/e2e/test_cluster*.py.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datapath import identity as ids
from datapath import plan
from datapath.errors import StateError
from datapath.fake import FakeKernel
from datapath.labels import Label
from datapath.nodes import Node
from datapath.policy import Repository
from datapath.store import MemoryStore as DocStore
from ipam.allocator import HostRanges, Ipam
from plugin.kvstore.memory import MemoryStore
from plugin.service import Agent
from plugin.service import cluster_keys as keys
from plugin.service.cluster import ClusterService, ClusterSettings, check_registration
from plugin.service.cluster_identities import ClusterIdentities, IdentityCache
from plugin.service.policy import PolicyState
from tests.kernel.helpers import wait_until


@dataclass
class SimNode:
    name: str
    agent: Agent
    kernel: FakeKernel
    service: ClusterService
    stop: threading.Event
    threads: list[threading.Thread]
    network: str = ""


class Cluster:
    def __init__(self, tmp: Path, store: MemoryStore) -> None:
        self.tmp = tmp
        self.store = store
        self.nodes: list[SimNode] = []

    def node(self, index: int, name: str = "", uid_dir: str = "", ttl: int = 10,
             ipv4: str = "", start: bool = True, identity_docs: DocStore | None = None) -> SimNode:
        name = name or f"n{index}"
        v4 = ipaddress.IPv4Network(ipv4 or f"10.192.{16 * index}.0/20")
        v6 = ipaddress.IPv6Network(f"fd63:6767:0:{index:x}::/64")
        kernel = FakeKernel()
        identities = ClusterIdentities(identity_docs or DocStore(), IdentityCache())
        policy = PolicyState(identities, Repository(), kernel)
        settings = plan.Settings("cgu", True, "rev1")
        agent = Agent(DocStore(), DocStore(), Ipam(DocStore(), HostRanges(v4, v6, 24, 80)), kernel, settings,
                      policy=policy)
        node = Node(name, ipaddress.IPv4Address(f"192.0.2.{index + 1}"), v4, v6)
        service = ClusterService(agent, self.store, ClusterSettings(node, "vxlan", ttl,
                                                                    self.tmp / (uid_dir or name)), identities)
        stop = threading.Event()
        sim = SimNode(name, agent, kernel, service, stop, [])
        if start:
            self.start(sim)
        self.nodes.append(sim)
        return sim

    def start(self, sim: SimNode) -> None:
        sim.service.start()
        sim.threads = sim.service.threads(sim.stop)
        for t in sim.threads:
            t.start()
        wait_until(sim.service.synced)
        nid = f"net-{sim.name}"
        pool = next(iter(sim.agent.ipam.ranges.ipv4.subnets(new_prefix=24)))
        gw = ipaddress.IPv4Interface(f"{pool[1]}/24")
        sim.agent.create_network(nid, [gw])
        sim.network = nid

    def add_endpoint(self, sim: SimNode, seed: str, labels: dict[str, str], host: int) -> Any:
        net = sim.agent.network(sim.network)
        gw = net.gateways[0]
        addr = ipaddress.IPv4Interface(f"{gw.network[host]}/{gw.network.prefixlen}")
        eid = (seed * 64)[:64]
        return sim.agent.create_endpoint(sim.network, eid, addr, None, labels=labels)

    def stop_all(self) -> None:
        for sim in self.nodes:
            sim.stop.set()
            sim.service.dirty.set()
        for sim in self.nodes:
            for t in sim.threads:
                t.join(timeout=5)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def cluster(tmp_path: Path, store: MemoryStore) -> Iterator[Cluster]:
    c = Cluster(tmp_path, store)
    yield c
    c.stop_all()


def remote_entries(sim: SimNode) -> dict[str, int]:
    view = sim.agent.cluster_view
    return {str(e.prefix): e.identity for e in view.entries} if view else {}


def kernel_ipcache(sim: SimNode) -> dict[str, int]:
    return {str(o.prefix): o.identity for o in sim.kernel.objects.values() if isinstance(o, plan.IpcacheEntry)}


def test_same_labels_get_the_same_number_on_every_node(cluster: Cluster) -> None:
    a, b = cluster.node(0), cluster.node(1)
    ea = cluster.add_endpoint(a, "a", {"app": "web"}, 10)
    eb = cluster.add_endpoint(b, "b", {"app": "web"}, 10)
    ec = cluster.add_endpoint(b, "c", {"app": "db"}, 11)
    assert ea.identity == eb.identity
    assert ec.identity != ea.identity
    assert ids.FIRST_ALLOCATED <= ea.identity <= ids.CLUSTER_LAST
    # both nodes reference the shared identity; only b the other one
    wait_until(lambda: a.service.users().get(ea.identity) == ["n0", "n1"])
    assert a.service.users()[ec.identity] == ["n1"]


def test_endpoints_reach_the_peers_ipcache_with_their_identity(cluster: Cluster) -> None:
    a, b = cluster.node(0), cluster.node(1)
    ep = cluster.add_endpoint(a, "a", {"app": "web"}, 10)
    addr = f"{ep.ipv4.ip}/32"
    wait_until(lambda: remote_entries(b).get(addr) == ep.identity)
    wait_until(lambda: kernel_ipcache(b).get(addr) == ep.identity)
    # the peer's labels are known on b (policy and the monitor name them)
    assert b.agent.labels_of(ep.identity) == ["container:app=web"]
    # the peer's node address is the remote-node identity; its range goes to it as world
    assert kernel_ipcache(b)["192.0.2.1/32"] == ids.REMOTE_NODE
    a.agent.delete_endpoint(a.network, ep.id)
    wait_until(lambda: addr not in kernel_ipcache(b))


def test_last_user_anywhere_releases_the_identity(cluster: Cluster, store: MemoryStore) -> None:
    a, b = cluster.node(0), cluster.node(1)
    ea = cluster.add_endpoint(a, "a", {"app": "web"}, 10)
    eb = cluster.add_endpoint(b, "b", {"app": "web"}, 10)
    number = ea.identity
    a.agent.delete_endpoint(a.network, ea.id)
    assert store.get(keys.id_key(number)) is not None  # b still uses it
    b.agent.delete_endpoint(b.network, eb.id)
    wait_until(lambda: store.get(keys.id_key(number)) is None)
    assert store.list(keys.IDENTITIES)[0] == []


def test_store_down_gives_a_pending_number_then_the_cluster_one(cluster: Cluster, store: MemoryStore) -> None:
    a, b = cluster.node(0), cluster.node(1)
    store.set_available(False)
    wait_until(lambda: not a.service.session.healthy, timeout=15)
    ep = cluster.add_endpoint(a, "a", {"app": "late"}, 10)
    assert ids.is_pending(ep.identity)
    store.set_available(True)
    moved = wait_until(lambda: keys.cluster_number(a.agent.endpoint(ep.id).identity), timeout=15)
    assert moved
    number = a.agent.endpoint(ep.id).identity
    wait_until(lambda: remote_entries(b).get(f"{ep.ipv4.ip}/32") == number, timeout=10)
    # the pending number was never published
    assert all(not ids.is_pending(v) for v in kernel_ipcache(b).values())


def test_bad_store_data_is_skipped(cluster: Cluster, store: MemoryStore) -> None:
    b = cluster.node(1)
    store.put(keys.node_key("evil"), b"{not json")
    store.put(keys.id_key(1), b'{"labels": ["container:x=y"]}')  # reserved number
    store.put(keys.id_key(99999999), b'{"labels": ["container:x=y"]}')  # beyond 2^24
    store.put(keys.IPCACHE + "10.192.0.9", keys.IpRecord(ipaddress.IPv4Address("10.192.0.9"), 1, "n0",
                                                         ipaddress.IPv4Address("192.0.2.1")).encode())
    store.put("cellgate/state/ip/v1/default/not-an-ip", b"{}")
    a = cluster.node(0)
    # n0 publishes 10.192.0.9 as identity 1 (host!) — refused; and an address outside its range
    store.put(keys.ip_key(ipaddress.IPv4Address("10.192.16.50")),
              keys.IpRecord(ipaddress.IPv4Address("10.192.16.50"), 300, "n0",
                            ipaddress.IPv4Address("192.0.2.1")).encode())
    ep = cluster.add_endpoint(a, "a", {"app": "web"}, 10)
    wait_until(lambda: f"{ep.ipv4.ip}/32" in remote_entries(b))
    entries = remote_entries(b)
    assert "10.192.0.9/32" not in entries and "10.192.16.50/32" not in entries
    assert 1 not in b.agent.policy.identities.cache.masters
    assert b.service.status()["bad_keys"] >= 4
    assert [n["name"] for n in b.service.node_list()] == ["n0", "n1"]


def test_a_second_agent_with_the_same_name_or_range_is_refused(cluster: Cluster, store: MemoryStore) -> None:
    cluster.node(0)
    same_name = keys.NodeRecord(Node("n0", ipaddress.IPv4Address("192.0.2.50"),
                                     ipaddress.IPv4Network("10.192.160.0/20"), None), "other-uid", "vxlan")
    with pytest.raises(StateError, match="node name n0 is registered by another live agent"):
        check_registration(store, same_name)
    overlap = keys.NodeRecord(Node("n9", ipaddress.IPv4Address("192.0.2.50"),
                                   ipaddress.IPv4Network("10.192.0.0/24"), None), "x", "vxlan")
    with pytest.raises(StateError, match=r"overlaps 10\.192\.0\.0/20 of live node n0"):
        check_registration(store, overlap)


def test_store_restarted_empty_is_refilled_with_the_same_numbers(cluster: Cluster, store: MemoryStore) -> None:
    a, b = cluster.node(0), cluster.node(1)
    ep = cluster.add_endpoint(a, "a", {"app": "web"}, 10)
    number = ep.identity
    wait_until(lambda: remote_entries(b).get(f"{ep.ipv4.ip}/32") == number)
    store.wipe()
    wait_until(lambda: store.get(keys.node_key("n0")) is not None and store.get(keys.node_key("n1")) is not None,
             timeout=15)
    wait_until(lambda: store.get(keys.id_key(number)) is not None, timeout=10)
    wait_until(lambda: store.get(keys.ip_key(ep.ipv4.ip)) is not None, timeout=10)
    assert a.agent.endpoint(ep.id).identity == number
    wait_until(lambda: remote_entries(b).get(f"{ep.ipv4.ip}/32") == number)


def test_local_identities_are_migrated_with_their_numbers(tmp_path: Path, store: MemoryStore) -> None:
    c = Cluster(tmp_path, store)
    docs = DocStore()
    docs.put("300", {"version": 1, "id": 300, "labels": ["container:app=old"], "owners": ["e1"]})
    docs.put("301", {"version": 1, "id": 301, "labels": ["container:app=taken"], "owners": ["e2"]})
    store.put(keys.id_key(301), keys.encode_identity(frozenset({Label("container", "app", "other")})))
    try:
        a = c.node(0, identity_docs=docs)
        wait_until(lambda: 300 in a.service.users() and len(a.service.users()) == 2)
        local = a.agent.policy.identities.local()
        assert local[300] == frozenset({Label("container", "app", "old")})  # kept its number
        assert 301 not in local  # 301 is another label set's in the cluster: renumbered
        assert frozenset({Label("container", "app", "taken")}) in local.values()
    finally:
        c.stop_all()
