"""The CLI as a user meets it, and `cellgate cleanup` leaving the host as it found it."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.harness import CELLGATE, Agent, Scene, run

pytestmark = pytest.mark.e2e


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
    refused = run(CELLGATE, "cleanup", *agent.args, check=False)
    assert refused.returncode != 0 and "holds" in refused.stderr  # never under a running agent
    agent.stop()
    report = agent.cleanup()
    assert report["links"] and report["pins"] and report["state"]
    assert agent.links() == []
    assert not agent.bpf.exists() and not agent.state.exists()
    assert not agent.plugin.exists() and not agent.api.exists()
    rules = run("iptables-save").stdout
    assert f"CG-{agent.name}" not in rules
    assert run("ip", "route", "show", "proto", "203").stdout.count(f"cg_{agent.name}") == 0
    assert others <= host_links()  # nothing that was not ours went away
    again = json.loads(run(CELLGATE, "cleanup", *agent.args, "-o", "json").stdout)
    assert again == {"links": [], "routes": [], "iptables": False, "pins": [], "sockets": [], "state": ""}
    agent.start()  # the fixture expects a live agent to tear down
