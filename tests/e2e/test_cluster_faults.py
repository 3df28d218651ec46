"""The cluster under faults, with real etcd and real agents: an agent SIGKILLed and restarted within
its lease, a node gone for good, etcd down and back, etcd compacted or restarted empty, a second
agent claiming a live node's name or range, and bad data in the store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.harness import CELLGATE
from tests.e2e.test_cluster import Scene, visible_everywhere
from tests.simcluster import Cluster, wait_until

TTL = 4


def running(ttl: int) -> Iterator[tuple[Cluster, Scene]]:
    """Two nodes with the lease TTL `ttl`, taken down afterwards."""
    c = Cluster(2, "vxlan", lease_ttl=ttl)
    c.up()
    scene = Scene(c)
    try:
        yield c, scene
    finally:
        scene.close()
        c.down()


@pytest.fixture
def pair() -> Iterator[tuple[Cluster, Scene]]:
    yield from running(TTL)


def etcdctl(c: Cluster, *args: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", c.ul, "etcdctl", "--endpoints", c.etcd_url, *args],
                         capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"), check=True)
    return out.stdout


def identities(c: Cluster, node: object) -> dict[tuple[str, ...], int]:
    return {tuple(i["labels"]): i["id"] for i in c.cli(node, "identity", "list") if not i["reserved"]}


@pytest.fixture
def slow_pair() -> Iterator[tuple[Cluster, Scene]]:
    """A TTL longer than an agent's start (it compiles the datapath)."""
    yield from running(20)


def test_agent_killed_and_restarted_within_the_ttl_breaks_nothing(slow_pair: tuple[Cluster, Scene]) -> None:
    c, scene = slow_pair
    a, b = c.node(1), c.node(2)
    fe, be = scene.endpoint(a, "k1", "frontend"), scene.endpoint(b, "k2", "backend")
    visible_everywhere(c, fe, be)
    before = identities(c, b)
    lease = c.cli(a, "status")["kvstore"]["lease_id"]
    c.kill_agent(a, signal.SIGKILL)
    assert scene.connect(fe, be.ipv4, 80) and scene.connect(be, fe.ipv4, 80)  # no agent: the kernel carries on
    c.start_agent(a)
    for _ in range(10):  # flows keep working while it comes back
        assert scene.connect(be, fe.ipv4, 80)
    st = c.cli(a, "status")["kvstore"]
    assert st["lease_id"] == lease  # the same lease: its keys were refreshed, never re-created
    wait_until(lambda: identities(c, a) == before, 10, "the same numbers")
    assert f"{fe.ipv4}/32" in c.ipcache(b)


def test_node_gone_past_the_ttl_is_cleaned_up(pair: tuple[Cluster, Scene]) -> None:
    c, scene = pair
    a, b = c.node(1), c.node(2)
    fe = scene.endpoint(a, "g1", "frontend")
    be = scene.endpoint(b, "g2", "backend")
    visible_everywhere(c, fe, be)
    number = identities(c, b)[("cni:app=frontend",)]
    c.kill_agent(a, signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: f"{fe.ipv4}/32" not in c.ipcache(b) and f"{a.address}/32" not in c.ipcache(b),
               TTL + 5, "the dead node's entries to go")
    assert time.monotonic() - started <= TTL + 5
    assert [n["name"] for n in c.cli(b, "node", "list")] == [b.name]
    wait_until(lambda: ("cni:app=frontend",) not in identities(c, b), 5, "its identity to be collected")
    assert f"/{number}/" not in etcdctl(c, "get", "--prefix", "--keys-only", "cellgate/state/identities/v1/refs/")
    routes = subprocess.run(["ip", "-n", b.netns, "route"], capture_output=True, text=True, check=True).stdout
    assert a.ipv4_range not in routes


def test_etcd_down_fails_closed_across_nodes_then_converges(pair: tuple[Cluster, Scene]) -> None:
    c, scene = pair
    a, b = c.node(1), c.node(2)
    fe, be = scene.endpoint(a, "d1", "frontend"), scene.endpoint(b, "d2", "backend")
    visible_everywhere(c, fe, be)
    c._etcd.stop()
    wait_until(lambda: not c.cli(a, "status")["kvstore"]["connected"], 10, "a to notice")
    assert scene.connect(fe, be.ipv4, 80)  # existing identities keep working from cached state
    late = scene.endpoint(a, "d3", "late")  # a label set nobody has numbered yet
    ident = c.cli(a, "endpoint", "get", late.ipv4)["identity"]
    assert ident >= 1 << 24  # pending: node-local
    assert scene.connect(late, fe.ipv4, 80)  # reachable on its node
    assert not scene.connect(late, be.ipv4, 80)  # fails closed across nodes
    c._etcd.start()
    started = time.monotonic()
    wait_until(lambda: scene.connect(late, be.ipv4, 80), 15, "the late endpoint to reach across")
    assert time.monotonic() - started <= 5 + 3  # 5 s plus one connect timeout per failed attempt
    # b learns the number's labels from the identities watch, which may trail the ipcache one
    def known() -> list[dict[tuple[str, ...], int]] | None:
        maps = [identities(c, n) for n in (a, b)]
        return maps if all(("cni:app=late",) in m for m in maps) else None

    numbers = wait_until(known, 5, "both nodes to know the late identity's labels")
    assert numbers[0][("cni:app=late",)] == numbers[1][("cni:app=late",)] < 1 << 24
    assert len(set(numbers[1].values())) == len(numbers[1])  # no duplicate identity


def test_etcd_compacted_or_restarted_empty_is_republished(pair: tuple[Cluster, Scene]) -> None:
    c, scene = pair
    a, b = c.node(1), c.node(2)
    fe, be = scene.endpoint(a, "r1", "frontend"), scene.endpoint(b, "r2", "backend")
    visible_everywhere(c, fe, be)
    before = identities(c, b)
    c._etcd.compact()
    late = scene.endpoint(a, "r3", "late")
    visible_everywhere(c, late)
    c._etcd.restart(empty=True)
    wait_until(lambda: len(etcdctl(c, "get", "--prefix", "--keys-only", "cellgate/state/nodes/").split()) == 2,
               TTL + 10, "both nodes re-registered")
    wait_until(lambda: f"{fe.ipv4}" in etcdctl(c, "get", "--prefix", "--keys-only", "cellgate/state/ip/"), 10,
               "the ipcache re-published")
    after = identities(c, b)
    assert {k: v for k, v in after.items() if k in before} == before  # the same numbers
    assert scene.connect(fe, be.ipv4, 80) and scene.connect(late, be.ipv4, 80)
    assert c.cli(a, "status")["kvstore"]["relists"] >= 1


def test_local_identities_are_migrated_when_a_kvstore_is_configured(pair: tuple[Cluster, Scene]) -> None:
    """A node that ran as a single host (local numbers) joins: its identities are migrated, not
    duplicated, and its endpoints reach across with them."""
    c, scene = pair
    a, b = c.node(1), c.node(2)
    be = scene.endpoint(b, "m2", "backend")
    c.kill_agent(a, signal.SIGTERM)
    wait_until(lambda: [n["name"] for n in c.cli(b, "node", "list")] == [b.name], TTL + 5, "a to leave")
    c.start_agent(a, kvstore=False)
    assert c.cli(a, "status").get("kvstore") is None
    solo = scene.endpoint(a, "m1", "solo")  # numbered by the single host
    before = c.cli(a, "endpoint", "get", solo.ipv4)["identity"]
    assert before < 1 << 24
    c.kill_agent(a, signal.SIGTERM)
    c.start_agent(a)  # now with the kvstore
    visible_everywhere(c, solo)

    def agreed() -> int | None:
        numbers = [identities(c, n).get(("cni:app=solo",)) for n in (a, b)]
        return numbers[0] if numbers[0] is not None and numbers[0] == numbers[1] else None

    number = wait_until(agreed, 10, "both nodes to agree on the migrated identity")
    assert c.cli(a, "endpoint", "get", solo.ipv4)["identity"] == number < 1 << 24
    ids_a = [i for i in c.cli(a, "identity", "list") if i["labels"] == ["cni:app=solo"]]
    assert len(ids_a) == 1  # migrated, not duplicated
    assert scene.connect(solo, be.ipv4, 80) and scene.connect(be, solo.ipv4, 80)


def test_second_agent_with_a_live_name_or_range_is_refused(pair: tuple[Cluster, Scene]) -> None:
    c, _ = pair
    a, b = c.node(1), c.node(2)
    for what, change in (("name", {"--node-name": a.name}), ("range", {"--ipv4-range": a.ipv4_range})):
        args = c.agent_args(b)
        for flag, value in change.items():
            args[args.index(flag) + 1] = value
        args[args.index("--name") + 1] = f"cg{c.tag}x"
        args[args.index("--state-dir") + 1] = f"{b.base}/other-{what}"
        args[args.index("--bpf-dir") + 1] = f"/sys/fs/bpf/cg{c.tag}x"
        args[args.index("--socket") + 1] = f"{b.base}/other.sock"
        args[args.index("--plugin-socket") + 1] = f"{b.base}/other-plugin.sock"
        cmd = ["ip", "netns", "exec", b.netns, CELLGATE, "agent", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 1, out.stderr
        assert "cannot join the cluster" in out.stderr and (a.name in out.stderr)
        assert not os.path.exists(f"{b.base}/other-{what}")  # refused before anything was made


def test_bad_data_in_the_store_is_skipped(pair: tuple[Cluster, Scene]) -> None:
    c, scene = pair
    a, b = c.node(1), c.node(2)
    fe = scene.endpoint(a, "b1", "frontend")
    visible_everywhere(c, fe)
    etcdctl(c, "put", "cellgate/state/nodes/v1/default/evil", "{not json")
    etcdctl(c, "put", "cellgate/state/identities/v1/id/99999999", '{"labels":["cni:app=x"]}')
    etcdctl(c, "put", "cellgate/state/identities/v1/id/1", '{"labels":["cni:app=x"]}')
    etcdctl(c, "put", "cellgate/state/ip/v1/default/10.99.0.1",
            f'{{"IP":"10.99.0.1","Mask":32,"HostIP":"{a.address}","ID":300,"node":"{a.name}"}}')
    etcdctl(c, "put", f"cellgate/state/ip/v1/default/{fe.ipv4}",
            f'{{"IP":"{fe.ipv4}","Mask":32,"HostIP":"{a.address}","ID":1,"node":"{a.name}"}}')
    wait_until(lambda: c.cli(b, "status")["kvstore"]["bad_keys"] >= 4, 10, "the bad keys counted")
    cache = c.ipcache(b)
    assert "10.99.0.1/32" not in cache
    # a forged "host" identity for the frontend's address was refused; a re-publishes the truth
    wait_until(lambda: c.ipcache(b).get(f"{fe.ipv4}/32", {}).get("identity") not in (None, 1), 10, "the truth")
    assert c.cli(b, "status")["kvstore"]["connected"]
    assert sorted(n["name"] for n in c.cli(b, "node", "list")) == sorted([a.name, b.name])
