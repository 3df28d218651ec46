"""The CLI as a user meets it, and `cellgate cleanup` leaving the host as it found it."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from pathlib import Path

import pytest

from datapath.naming import proxy_table
from tests.e2e.cni_support import Cni, Namespaces, host_ifname, running_agent
from tests.e2e.harness import CELLGATE, Agent, Scene, run, wait_until

pytestmark = pytest.mark.e2e


CGROUP2 = "/sys/fs/cgroup/unified"


def cgroup_program_ids() -> set[int]:
    """Ids of the programs attached to the cgroup2 root."""
    return {p["id"] for p in json.loads(run("bpftool", "-j", "cgroup", "show", CGROUP2).stdout.strip() or "[]")}


def attached_socket_programs(agent: Agent) -> dict[str, int]:
    """Pinned socket program → its id, for those of the agent attached to the cgroup2 root."""
    attached = cgroup_program_ids()
    pins = {}
    for pin in sorted((agent.bpf / "progs").glob("*")):
        prog = json.loads(run("bpftool", "-j", "prog", "show", "pinned", str(pin)).stdout)
        if prog["id"] in attached:
            pins[pin.name] = prog["id"]
    return pins


def host_links() -> set[str]:
    return {line.split(": ")[1].split("@")[0] for line in run("ip", "-o", "link").stdout.splitlines()}


def test_cli_tables_and_json_agree(scene: Scene, agent: Agent) -> None:
    net = scene.network("--ipv6")
    c = scene.run(net)
    ip = scene.ip(c, net)
    (ep,) = agent.endpoints()
    table = agent.cli("endpoint", "list").stdout
    assert table.splitlines()[0].split() == ["ENDPOINT", "NETWORK", "INTERFACE", "IPV4", "IPV6", "IDENTITY", "STATE",
                                            "LABELS"]
    assert ep["id"][:12] in table and ip in table
    for ident in (ep["id"], ep["id"][:8], ep["interface"], ip):
        assert agent.json("endpoint", "get", ident)["id"] == ep["id"]
    assert "labels:" in agent.cli("endpoint", "get", ep["id"][:10]).stdout
    missing = agent.cli("endpoint", "get", "ffffffffffff", check=False)
    assert missing.returncode == 2 and "no endpoint matches" in missing.stderr
    ipam_table = agent.cli("ipam", "list").stdout
    assert ip in ipam_table and "gateway" in ipam_table
    assert agent.cli("ipam", "check").returncode == 0
    nets = agent.json("network", "list")
    assert len(nets) == 1 and nets[0]["endpoints"] == 1 and len(nets[0]["subnets"]) == 2
    status = agent.json("status")
    assert status["instance"] == agent.name and status["endpoints"] == 1


def test_cli_without_an_agent_says_so() -> None:
    proc = subprocess.run([CELLGATE, "status", "--socket", "/run/cg-no-such-agent.sock"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "cannot reach the cellgate agent" in proc.stderr


def test_cleanup_removes_everything_of_the_instance_and_nothing_else(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    scene.run(net)
    ours = set(agent.links())
    assert ours
    others = host_links() - ours
    socket_progs = attached_socket_programs(agent)
    assert socket_progs, "the agent attached its socket programs to the cgroup2 root"
    refused = run(CELLGATE, "cleanup", *agent.args, check=False)
    assert refused.returncode != 0 and "holds" in refused.stderr  # never under a running agent
    agent.stop()
    report = agent.cleanup()
    assert report["links"] and report["pins"] and report["state"]
    assert len(report["socket_programs"]) == len(socket_progs)
    attached = {p["id"] for p in json.loads(run("bpftool", "-j", "cgroup", "show", CGROUP2).stdout.strip() or "[]")}
    assert not attached & set(socket_progs.values())  # detached from the cgroup2 root
    assert agent.links() == []
    assert not agent.bpf.exists() and not agent.state.exists()
    assert not agent.plugin.exists() and not agent.api.exists()
    rules = run("iptables-save").stdout
    assert f"CG-{agent.name}" not in rules
    assert run("ip", "route", "show", "proto", "203").stdout.count(f"cg_{agent.name}") == 0
    table = proxy_table(agent.name)  # the L7 proxy's routing: its rule and table gone, other instances' kept
    assert f"lookup {table}" not in run("ip", "rule").stdout + run("ip", "-6", "rule").stdout
    assert "proxy-ipv4" in report["routes"] and not run("ip", "route", "show", "table", str(table), check=False).stdout
    assert others <= host_links()  # nothing that was not ours went away
    again = json.loads(run(CELLGATE, "cleanup", *agent.args, "-o", "json").stdout)
    assert again == {"links": [], "routes": [], "iptables": False, "pins": [], "sockets": [], "state": "",
                     "proxy": 0, "socket_programs": []}
    agent.start()  # the fixture expects a live agent to tear down


KILL_AT_VETH = "kernel.veth.created=exit"  # the agent dies as by SIGKILL right after the kernel made a veth


def test_a_kill_between_creating_and_tagging_a_veth_leaves_nothing_cleanup_or_a_retry_cannot_handle(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with running_agent(tmp_path_factory, "cgk", failpoints=KILL_AT_VETH) as agent:
        namespaces = Namespaces()
        runtime = Cni(agent, namespaces)
        try:
            conf = runtime.conf("cgkill", "1.0.0")

            def add_and_die(cid: str, ns_path: str) -> str:
                assert runtime.add(conf, cid, ns_path).rc != 0
                assert agent.proc is not None and agent.proc.wait(timeout=30) == 137
                agent.proc = None
                name = host_ifname(cid, "eth0")
                assert name in host_links()  # the veth the agent was making when it died
                return name

            # no restart: `cellgate cleanup` removes the half-made veth (and with it its peer in the netns)
            ns = namespaces.new()
            name = add_and_die(runtime.cid(), ns.path)
            others = host_links() - {name, f"cg_{agent.name}"}
            report = agent.cleanup()
            assert name in report["links"]
            assert name not in host_links() and f"cg_{agent.name}" not in host_links()
            assert ns.links() == ["lo"]
            assert others <= host_links()

            # restart: the runtime's DEL after the failed ADD and its ADD again succeed; DEL leaves no link
            agent.start()
            ns = namespaces.new()
            cid = runtime.cid()
            name = add_and_die(cid, ns.path)
            agent.failpoints = ""
            agent.start()
            runtime.delete(conf, cid, ns.path).empty()
            runtime.add(conf, cid, ns.path).result()
            assert ns.interface("eth0") is not None and name in agent.links()
            runtime.delete(conf, cid, ns.path).empty()
            assert name not in host_links() and ns.links() == ["lo"]
        finally:
            try:
                runtime.close()
            finally:
                namespaces.close()


@pytest.mark.parametrize(("v4", "v6", "text"), [
    ("127.0.0.0/20", "fd63:77:1::/64", "host range 127.0.0.0/20 overlaps 127.0.0.0/8 (loopback)"),
    ("224.0.0.0/20", "fd63:77:1::/64", "host range 224.0.0.0/20 overlaps 224.0.0.0/4 (multicast)"),
    ("10.99.0.0/20", "fe80::/64", "host range fe80::/64 overlaps fe80::/10 (link-local)"),
])
def test_agent_refuses_special_purpose_host_ranges_before_making_anything(
        tmp_path_factory: pytest.TempPathFactory, v4: str, v6: str, text: str) -> None:
    name = "cgr" + secrets.token_hex(3)
    agent = Agent(tmp_path_factory.mktemp(name), name, v4, v6, docker_host="unix:///nonexistent")
    proc = subprocess.Popen([CELLGATE, "agent", *agent.args, "--cni-bin-dir", ""], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it took the range and runs: stop it and remove what it made
            proc.terminate()
            proc.wait(timeout=30)
            agent.cleanup()
    assert proc.returncode == 1 and text in stderr, stderr
    assert not agent.state.exists() and not agent.bpf.exists()
    assert not agent.plugin.exists() and not agent.api.exists()
    assert agent.links() == [] and f"CG-{name}" not in run("iptables-save").stdout



def held_program_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process `pid` holds a descriptor of (its fdinfo names them)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            ids |= {int(line.split()[1]) for line in info.read_text().splitlines() if line.startswith("prog_id:")}
    return ids


def test_an_agent_whose_pins_die_with_it_attaches_no_socket_program(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under `ip netns exec` /sys is remounted: the bpffs the agent mounts there is its own and
    vanishes with it, so programs it put on the host's cgroup2 root could never be found and detached
    again (found: 8 programs per CI run left attached, one set per such agent). It balances by packet
    only ('auto'), refuses an explicit cgroup, and leaves the root's programs as they were, also
    after a SIGKILL."""
    name = "cgp" + secrets.token_hex(3)
    ns = f"{name}n"
    agent = Agent(tmp_path_factory.mktemp(name), name, "10.235.16.0/20", "fd63:77:2::/64",
                  docker_host="unix:///nonexistent")
    args = [*agent.args, "--cni-bin-dir", "", "--plugin-socket", str(agent.base / "plugin.sock")]
    run("ip", "netns", "add", ns)
    proc: subprocess.Popen[bytes] | None = None
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        refused = run("ip", "netns", "exec", ns, CELLGATE, "agent", *args, "--socket-lb", CGROUP2, check=False,
                      timeout=60)
        assert refused.returncode == 1, refused.stderr
        assert f"--socket-lb {CGROUP2}: the socket programs could not be detached again" in refused.stderr
        assert "ip netns exec" in refused.stderr and "--bpf-dir" in refused.stderr  # why, and what to do

        with open(agent.log, "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, CELLGATE, "agent", *args], stdout=log, stderr=log)
        wait_until(lambda: proc.poll() is None and agent.cli("status", check=False).returncode == 0, 60, "the agent")
        status = agent.json("status")
        assert status["balancing"]["socket"] == ""
        assert "no socket-level balancing" in agent.log.read_text()
        assert agent.json("service", "create", "--frontend", "10.96.77.1:80", "--backends", "10.235.16.9:80",
                          "--name", "cgweb")["name"] == "cgweb"  # services still work, by packet
        held = held_program_ids(proc.pid)  # `ip netns exec` execs the agent: the same process
        assert len(held) >= 8  # its socket programs are loaded (and would be attached with shared pins)
        assert not held & cgroup_program_ids()
        proc.kill()
        proc.wait(timeout=30)
        proc = None
        assert not held & cgroup_program_ids()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
        run("ip", "netns", "exec", ns, CELLGATE, "cleanup", *args, check=False)
        run("ip", "netns", "del", ns, check=False)
