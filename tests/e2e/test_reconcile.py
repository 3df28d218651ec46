"""Nothing stale after downtime: what Docker did while the agent was down is reconciled.

Docker never replays the calls it could not make (`docker rm -f`, `network rm`, `network
disconnect`, a dockerd restart; each waits out Docker's 30 s of retries). When the agent
comes back it asks Docker what still exists and removes the rest, with everything it held;
nothing Docker still has is touched. Also: SIGKILL in the middle of a `docker run`.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.harness import Agent, Dockerd, Scene, docker_agent, wait_until

pytestmark = pytest.mark.e2e

GRACE = "3"  # seconds Docker may be silent about what we hold; short, so the tests wait little


@pytest.fixture(scope="module")
def agent(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with docker_agent(dockerd, tmp_path_factory, "cgr", ("--reconcile-grace", GRACE, "--docker-resync", "5")) as a:
        yield a


def endpoint_of(scene: Scene, container: str, net: str) -> str:
    return str(scene.d.inspect(container)["NetworkSettings"]["Networks"][net]["EndpointID"])


def in_parallel(*jobs: Callable[[], Any]) -> None:
    """Run Docker commands side by side: each waits out Docker's retries of the absent agent."""
    errors: list[BaseException] = []

    def wrap(job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


def links(agent: Agent) -> set[str]:
    return set(agent.links())


def consistent(agent: Agent) -> dict[str, Any]:
    """`ipam check` finds nothing wrong: no stale network or endpoint, no leak, nothing missing."""
    out = agent.cli("ipam", "check", "--grace", "0", "-o", "json", check=False)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], report
    assert report["docker"] == "reachable"
    return report


def test_rm_network_rm_and_disconnect_while_the_agent_is_down_leave_nothing_stale(
        scene: Scene, agent: Agent) -> None:
    keep_net, side_net, doomed_net = scene.network(), scene.network(), scene.network()
    subnet = scene.d.inspect(doomed_net)["IPAM"]["Config"][0]["Subnet"]
    server, client = scene.server(keep_net), scene.run(keep_net)  # Docker keeps these: untouched
    removed = scene.run(keep_net)  # `docker rm -f` while the agent is down
    scene.d("network", "connect", side_net, client)  # `docker network disconnect` while down
    lonely = scene.run(doomed_net)  # removed with its network while down
    held = {c: endpoint_of(scene, c, keep_net) for c in (server, client, removed)}
    side_ep, lonely_ep = endpoint_of(scene, client, side_net), endpoint_of(scene, lonely, doomed_net)
    wait_until(lambda: {e["id"] for e in agent.endpoints()} == {*held.values(), side_ep, lonely_ep},
               what="all five endpoints")
    target = scene.ip(server, keep_net)
    assert "hello from" in scene.tcp(client, target)
    before = links(agent)

    agent.signal(signal.SIGKILL)
    in_parallel(
        lambda: scene.d("rm", "-f", removed, timeout=300),
        lambda: scene.d("network", "disconnect", side_net, client, timeout=300),
        lambda: (scene.d("rm", "-f", lonely, timeout=300), scene.d("network", "rm", doomed_net, timeout=300)),
    )
    scene.containers.remove(removed)
    scene.containers.remove(lonely)
    scene.networks.remove(doomed_net)
    agent.start()

    live = {held[server], held[client]}
    wait_until(lambda: {e["id"] for e in agent.endpoints()} == live, what="the stale endpoints to go")
    networks = {n["id"] for n in agent.json("network", "list")}
    docker_nets = {scene.d.inspect(n)["Id"] for n in (keep_net, side_net)}
    assert networks == docker_nets
    gone = {f"cg{e[:13]}" for e in (held[removed], side_ep, lonely_ep)}
    wait_until(lambda: not gone & links(agent), 10, "their veths to go (right after their removal)")
    assert links(agent) < before
    report = consistent(agent)
    assert report["leaked"] == [] and report["stale"]["endpoints"] == []
    # what Docker still has kept working throughout, and keeps its addresses
    assert "hello from" in scene.tcp(client, target)
    addresses = [a for a, kind, _ in agent.allocations() if kind == "endpoint"]
    assert sorted(addresses) == sorted(
        [scene.ip(server, keep_net), scene.ip(client, keep_net)])
    # the subnet of the network removed meanwhile is free again, and the address of the removed
    # container can be had again without a duplicate
    again = scene.network("--subnet", subnet)
    assert scene.d.inspect(again)["IPAM"]["Config"][0]["Subnet"] == subnet
    third = scene.run(keep_net)
    assert scene.ip(third, keep_net) not in (scene.ip(server, keep_net), scene.ip(client, keep_net))
    assert "hello from" in scene.tcp(third, target)
    consistent(agent)


def test_a_dockerd_restart_while_the_agent_is_down_leaves_nothing_stale(
        scene: Scene, agent: Agent, dockerd: Dockerd) -> None:
    net, empty = scene.network(), scene.network()
    subnet = scene.d.inspect(empty)["IPAM"]["Config"][0]["Subnet"]
    first, second = scene.run(net), scene.run(net)
    old_a, old_b = scene.ip(first, net), scene.ip(second, net)
    endpoints = {endpoint_of(scene, c, net) for c in (first, second)}
    wait_until(lambda: {e["id"] for e in agent.endpoints()} >= endpoints, what="both endpoints")
    agent.signal(signal.SIGTERM)
    scene.d("network", "rm", empty, timeout=300)  # Docker waits out its retries, then forgets it
    scene.networks.remove(empty)
    dockerd.restart()  # without live-restore the containers die; Docker's cleanup calls find no agent
    agent.start()  # the events stream connects to a new dockerd: reconciliation runs
    wait_until(lambda: not {e["id"] for e in agent.endpoints()} & endpoints, what="the dead containers' endpoints")
    wait_until(lambda: [n["id"] for n in agent.json("network", "list")] == [scene.d.inspect(net)["Id"]],
               what="only the network Docker still has")
    assert not {f"cg{e[:13]}" for e in endpoints} & links(agent)
    consistent(agent)
    scene.network("--subnet", subnet)  # the subnet of the network removed meanwhile is free again
    scene.d("start", first)
    scene.d("start", second)
    a, b = scene.ip(first, net), scene.ip(second, net)
    assert a != b
    scene.exec(first, "ping", "-c", "1", "-W", "2", b)
    # Their old addresses were kept while Docker's records of the stopped containers named them;
    # the containers' start events (new addresses in those records) have them judged and released.
    wait_until(lambda: all(a not in (old_a, old_b) for a, _, _ in agent.allocations()), 20,
               "the addresses the dead containers had to be released")
    consistent(agent)


def test_nothing_is_removed_while_docker_cannot_be_asked(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    c = scene.run(net)
    eid = endpoint_of(scene, c, net)
    wait_until(lambda: eid in {e["id"] for e in agent.endpoints()}, what="the endpoint")
    agent.stop()
    blind = Agent(agent.base, agent.name, agent.v4, agent.v6, docker_host=f"unix://{agent.base}/cgnone.sock")
    blind.args += ["--reconcile-grace", "0"]
    blind.start()
    try:
        out = blind.cli("ipam", "check", "--release", "--grace", "0", "-o", "json", check=False)
        report = json.loads(out.stdout)
        assert report["docker"].startswith("unreachable"), report
        assert report["stale"]["networks"] == [] and report["stale"]["endpoints"] == []
        assert eid in {e["id"] for e in blind.endpoints()}
        assert scene.d.inspect(net)["Id"] in {n["id"] for n in blind.json("network", "list")}
    finally:
        blind.stop()
    agent.start()
    assert eid in {e["id"] for e in agent.endpoints()}
    scene.exec(c, "ping", "-c", "1", "-W", "2", scene.d.inspect(net)["IPAM"]["Config"][0]["Gateway"])
    consistent(agent)


def test_sigkill_during_docker_run_leaves_no_endpoint_and_no_reused_address(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    peer = scene.run(net)
    peer_ip = scene.ip(peer, net)
    agent.stop()
    usual = list(agent.args)
    agent.args += ["--reconcile-grace", "600"]  # no reconciliation: Docker's own calls must suffice
    agent.start(failpoints="docker.create_endpoint.before_reply=exit")
    name = f"cgk{scene.tag}"
    scene.containers.append(name)
    started = subprocess.Popen(["docker", "run", "-d", "--name", name, "--label", f"cgtest={agent.name}",
                                "--network", net, scene.image, "sleep", "3600"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=scene.d.env)
    try:
        assert agent.proc is not None
        agent.proc.wait(timeout=60)  # the failpoint: persisted, then killed before the reply
        assert agent.proc.returncode == 137
        agent.proc = None
        agent.start()  # back within Docker's 30 s of retries
        _, err = started.communicate(timeout=300)
        print("docker run:", started.returncode, err)  # the retried call's error, for the log
    finally:
        started.kill()
    state = scene.d.inspect(name)["State"]
    if started.returncode == 0:  # the retry carried its body: the same endpoint, idempotently
        assert state["Running"], state
        live = {endpoint_of(scene, peer, net), endpoint_of(scene, name, net)}
    else:  # the retry came with an empty body: Docker gave up and released the address
        assert not state["Running"]
        live = {endpoint_of(scene, peer, net)}
    assert {e["id"] for e in agent.endpoints()} == live  # at once, not after a reconciliation
    consistent(agent)
    # every address handed out from now on is free: never one a live endpoint holds
    fresh = [scene.run(net) for _ in range(3)]
    ips = [peer_ip] + [scene.ip(c, net) for c in fresh] + ([scene.ip(name, net)] if started.returncode == 0 else [])
    assert len(ips) == len(set(ips)), ips
    report = consistent(agent)
    assert report["missing"] == [] and report["duplicates"] == []
    agent.stop()
    agent.args = usual
    agent.start()


def test_an_address_docker_never_releases_is_freed_once_no_request_can_claim_it(scene: Scene, agent: Agent) -> None:
    v4 = list(ipaddress.ip_network(agent.v4).subnets(new_prefix=24))[-1]
    v6 = list(ipaddress.ip_network(agent.v6).subnets(new_prefix=80))[-1]
    net = scene.network("--ipv6", "--subnet", str(v4), "--subnet", str(v6))
    gateway6 = str(v6.network_address + 1)  # the IPAM's gateway: the subnet's first address
    assert any(g.endswith(f" {gateway6}") or g == gateway6 for n in agent.json("network", "list")
               for g in n["gateways"]), agent.json("network", "list")
    name = f"cgv{scene.tag}"
    scene.containers.append(name)
    # Docker allocates the IPv4 address, is refused the IPv6 gateway, fails the run and never
    # releases the IPv4 address
    failed = scene.d.attempt("run", "-d", "--name", name, "--label", f"cgtest={agent.name}", "--network", net,
                             "--ip6", gateway6, scene.image, "sleep", "3600")
    assert failed.returncode != 0 and "gateway" in failed.stderr, failed.stderr
    wait_until(lambda: consistent(agent), timeout=60, what="the orphaned IPv4 address to be freed")
    assert [a for a, kind, _ in agent.allocations() if kind == "endpoint"] == []


def test_a_cni_attachment_its_runtime_forgot_while_the_agent_was_down_is_reported_and_released(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.e2e.cni_support import Cni, Namespaces, Processes, host_ifname, running_agent

    namespaces, processes = Namespaces(), Processes()
    with running_agent(tmp_path_factory, "cgs") as cni_agent:
        cni = Cni(cni_agent, namespaces)
        try:
            ns = namespaces.new()
            processes.start("ip", "netns", "exec", ns.name, "sleep", "600")  # keeps the namespace alive
            conf = cni.conf(f"cgst{namespaces.tag}", "1.1.0")
            cid = cni.cid()
            cni.add(conf, cid, ns.path).result()
            cni_agent.stop()
            cni.delete(conf, cid, ns.path).error(11)  # the runtime's DEL finds no agent...
            namespaces.delete(ns)  # ...and it forgets the namespace, which a process still holds
            cni_agent.start()
            assert host_ifname(cid, "eth0") in cni_agent.links()  # the veth lives on: restore keeps it
            out = cni_agent.cli("ipam", "check", "-o", "json", check=False)
            report = json.loads(out.stdout)
            assert out.returncode == 1 and not report["ok"], report
            assert [e["reason"] for e in report["stale"]["endpoints"]] == [
                f"its network namespace {ns.path} is gone"]
            cni_agent.cli("ipam", "check", "--release")
            assert cni_agent.endpoints() == [] and host_ifname(cid, "eth0") not in cni_agent.links()
            assert [kind for _, kind, _ in cni_agent.allocations()] == ["gateway"]
            assert json.loads(cni_agent.cli("ipam", "check", "-o", "json").stdout)["ok"]
        finally:
            processes.close()
            cni.close()
            namespaces.close()
