"""Crashes and restarts: nothing is lost, nothing leaks, traffic keeps flowing. (Bad input at every door
is tests/e2e/test_bad_input.py.)"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.e2e.harness import CELLGATE, Agent, Scene, run, wait_until
from tests.e2e.snapshot import across_restart, differences, snapshot

pytestmark = pytest.mark.e2e


def addresses_in_use(scene: Scene, containers: list[str], net: str) -> list[str]:
    return [scene.ip(c, net) for c in containers]


def assert_no_leak_no_duplicate(agent: Agent) -> None:
    report = agent.json("ipam", "check", "--grace", "0")
    assert report["ok"], report
    owned = [a for a, k, _ in agent.allocations() if k == "endpoint"]
    assert len(owned) == len(set(owned))
    live = sorted(e["ipv4"].split("/")[0] for e in agent.endpoints() if e["ipv4"])
    assert sorted(owned) == live


def test_agent_sigkill_and_restart_keep_traffic_and_state(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    server, client = scene.server(net), scene.run(net)
    target = scene.ip(server, net)
    before = snapshot(agent)
    probe = subprocess.Popen(
        ["docker", "exec", client, "ping", "-c", "40", "-i", "0.1", "-W", "1", target],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=scene.d.env,
    )
    try:
        agent.signal(signal.SIGKILL)  # no chance to clean up: sockets stay behind
        assert agent.plugin.exists()
        assert "hello from" in scene.tcp(client, target)  # the datapath runs without the agent
        agent.start()
        out, _ = probe.communicate(timeout=60)
    finally:
        probe.kill()
    assert "40 packets received, 0% packet loss" in out, out
    before, after = across_restart(before), across_restart(snapshot(agent))
    assert after == before, differences(before, after)
    # a new container gets a fresh address, never one in use
    third = scene.run(net)
    fresh = scene.ip(third, net)
    assert fresh not in addresses_in_use(scene, [server, client], net)
    assert "hello from" in scene.tcp(third, target)
    assert_no_leak_no_duplicate(agent)


def test_agent_sigterm_removes_sockets_and_restarts_cleanly(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    c = scene.run(net)
    agent.signal(signal.SIGTERM)
    assert not agent.plugin.exists() and not agent.api.exists()
    gateway = scene.d.inspect(net)["IPAM"]["Config"][0]["Gateway"]
    scene.exec(c, "ping", "-c", "1", "-W", "2", gateway)  # traffic flows while the agent is stopped
    agent.start()
    assert len(agent.endpoints()) == 1
    log = agent.log.read_text()
    assert "restored 1 networks and 1 endpoints" in log


def test_interface_vanishing_while_agent_is_down_is_released_on_restart(scene: Scene, agent: Agent) -> None:
    """The container's interface goes away while the agent is down: restore drops its endpoint, and
    keeps its address, unbound, while Docker still holds it for the container (handing it out again
    would give two containers one address in Docker's view); Docker's ReleaseAddress frees it."""
    net = scene.network()
    keep, gone = scene.run(net), scene.run(net)
    gone_ip = scene.ip(gone, net)
    (ep,) = [e for e in agent.endpoints() if e["ipv4"].startswith(gone_ip + "/")]
    agent.signal(signal.SIGKILL)
    run("ip", "link", "del", ep["interface"])  # as when a container's namespace is destroyed
    agent.start()
    assert all(e["id"] != ep["id"] for e in agent.endpoints())
    assert [(a, owner) for a, _, owner in agent.allocations() if a == gone_ip] == [(gone_ip, "")]
    assert f"kept {gone_ip} while Docker holds it" in agent.log.read_text()
    assert scene.ip(keep, net) in [e["ipv4"].split("/")[0] for e in agent.endpoints()]
    scene.d("rm", "-f", gone)  # Docker's late Leave/DeleteEndpoint/ReleaseAddress are tolerated
    wait_until(lambda: all(a != gone_ip for a, _, _ in agent.allocations()), 40, "Docker's ReleaseAddress")
    assert_no_leak_no_duplicate(agent)


def test_docker_calls_during_an_agent_restart_are_retried_and_succeed(scene: Scene, agent: Agent) -> None:
    """Docker retries a dead plugin for 30 s; an agent back within that window serves the calls."""
    net = scene.network()
    c = scene.run(net)
    ip = scene.ip(c, net)
    agent.signal(signal.SIGKILL)
    rm = subprocess.Popen(
        ["docker", "rm", "-f", c], env=scene.d.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    agent.start()
    out, _ = rm.communicate(timeout=60)
    assert rm.returncode == 0, out
    wait_until(lambda: all(a != ip for a, _, _ in agent.allocations()), 40, "Docker's retried ReleaseAddress")
    assert agent.endpoints() == []
    assert_no_leak_no_duplicate(agent)


def test_dockerd_restart_leaves_no_stale_endpoint_and_no_leak(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    plain = [scene.run(net) for _ in range(3)]
    always = scene.run(net, "--restart", "always")
    old = set(addresses_in_use(scene, [*plain, always], net))
    scene.d.restart()  # live-restore is off: containers die, Docker cleans up, 'always' comes back
    wait_until(lambda: scene.d.inspect(always)["State"]["Running"], 60, "restart-policy container")
    eps = agent.endpoints()
    assert len(eps) == 1, eps
    assert eps[0]["ipv4"].split("/")[0] == scene.ip(always, net)
    assert_no_leak_no_duplicate(agent)
    fresh = [scene.run(net) for _ in range(3)]
    ips = addresses_in_use(scene, [always, *fresh], net)
    assert len(set(ips)) == 4
    assert_no_leak_no_duplicate(agent)
    assert "hello from" in scene.tcp(fresh[0], scene.ip(scene.server(net), net))
    del old


def test_dockerd_live_restore_keeps_containers_and_addresses(scene: Scene, agent: Agent) -> None:
    scene.d.stop()
    scene.d.start("--live-restore")
    try:
        net = scene.network()
        server, client = scene.server(net), scene.run(net)
        target = scene.ip(server, net)
        before = snapshot(agent)
        scene.d.restart()
        assert scene.d.inspect(server)["State"]["Running"]
        after = snapshot(agent)
        assert after == before, differences(before, after)  # no driver calls on a live restore
        assert "hello from" in scene.tcp(client, target)
        newcomer = scene.run(net)
        assert scene.ip(newcomer, net) not in (target, scene.ip(client, net))
        assert_no_leak_no_duplicate(agent)
    finally:
        scene.close()
        scene.containers.clear()
        scene.networks.clear()
        scene.d.stop()
        scene.d.start()


def _status_line(sock: socket.socket) -> int:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {line!r}"
        line += chunk
    return int(line.split()[1])


def test_half_requests_and_open_monitors_stall_neither_docker_nor_the_cli(scene: Scene, agent: Agent) -> None:
    """More clients than request workers stuck in half a request on both sockets, then more monitor
    streams than their bound: Docker's calls and the CLI are still answered at once."""
    clients: list[socket.socket] = []
    try:
        for path in (agent.plugin, agent.api):
            for n in range(70):
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(20)
                sock.connect(str(path))
                sock.sendall((b"", b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nContent-Le")[n % 2])
                clients.append(sock)
        started = time.monotonic()
        name = f"cgn{scene.tag}s"
        scene.networks.append(name)
        scene.d("network", "create", "-d", agent.name, "--ipam-driver", agent.name, name, timeout=20)
        agent.cli("status")
        assert time.monotonic() - started < 10

        monitors = []
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(20)
            sock.connect(str(agent.api))
            sock.sendall(b"GET /v1/monitor HTTP/1.1\r\nHost: cellgate\r\n\r\n")
            monitors.append(sock)
            clients.append(sock)
        statuses = [_status_line(sock) for sock in monitors]
        assert statuses.count(200) == 16 and statuses.count(503) == 4, statuses
        started = time.monotonic()
        assert agent.json("status")["monitor"]["subscribers"] == 16
        assert time.monotonic() - started < 5
        gateway = scene.d.inspect(name)["IPAM"]["Config"][0]["Gateway"]
        scene.exec(scene.run(name), "ping", "-c", "1", "-W", "2", gateway)  # CreateEndpoint, Join
    finally:
        for sock in clients:
            sock.close()
    # the closed monitors end at their next heartbeat and give their slots back: none is left
    # open for later tests (a leaked slot would refuse their monitors)
    wait_until(lambda: agent.json("status")["monitor"]["subscribers"] == 0, 15, "the monitor streams to end")


def test_monitor_shows_a_spoofed_packet_dropped(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    victim = scene.run(net)
    attacker = scene.run(net, "--cap-add", "NET_ADMIN")
    subnet = scene.d.inspect(net)["IPAM"]["Config"][0]["Subnet"]
    forged = ".".join(subnet.split("/")[0].split(".")[:3]) + ".200"
    attacker_ep = next(e for e in agent.endpoints() if e["ipv4"].startswith(scene.ip(attacker, net) + "/"))
    # a legitimate ping first, so the forged one finds the victim's neighbour entry already in place
    # (otherwise the first frame out is an ARP request with the forged sender, dropped as invalid ARP)
    scene.exec(attacker, "ping", "-c", "1", "-W", "2", scene.ip(victim, net))
    monitor = subprocess.Popen(
        [
            CELLGATE,
            "monitor",
            "--type",
            "drop",
            "-o",
            "json",
            "--count",
            "1",
            "--timeout",
            "30",
            "--socket",
            str(agent.api),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: agent.json("status")["monitor"]["subscribers"] >= 1, 10, "monitor to subscribe")
        scene.exec(attacker, "ip", "addr", "add", f"{forged}/24", "dev", "eth0")
        ping = scene.exec(attacker, "ping", "-c", "2", "-W", "1", "-I", forged, scene.ip(victim, net), check=False)
        assert ping.returncode != 0
        out, err = monitor.communicate(timeout=40)
    finally:
        monitor.kill()
    assert monitor.returncode == 0, err
    event = json.loads(out.splitlines()[0])
    assert event["reason"] == "invalid source IP"
    assert event["src"] == forged and event["dst"] == scene.ip(victim, net)
    assert event["endpoint"] == attacker_ep["id"]
    status = agent.json("status")
    assert any(c["name"] == "DROP_INVALID_SIP" and c["packets"] >= 1 for c in status["counters"])
    # the text form names the reason too
    text = agent.cli("status").stdout
    assert "invalid source IP" in text
