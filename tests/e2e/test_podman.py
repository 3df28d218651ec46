"""Podman (Debian's 4.3, CNI backend) on a cellgate network, next to Docker, under one policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Scene, run, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # .venv/bin holds the cellgate-cni launcher


class Podman:
    """Podman with its own storage, CNI config dir and containers.conf (no system files touched)."""

    def __init__(self, base: Path, agent: Agent, network: str) -> None:
        self.base = base
        self.network = network
        (base / "net.d").mkdir(parents=True)
        conf = base / "containers.conf"
        conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'  # this sandbox lacks CAP_SYS_RESOURCE
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{BIN}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{base / "net.d"}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            'runtime = "runc"\n'
        )
        example = json.loads((REPO / "examples" / "cni" / "podman.conflist").read_text())
        example["name"] = network
        example["plugins"][0]["socket"] = str(agent.api)
        (base / "net.d" / f"{network}.conflist").write_text(json.dumps(example))
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))

    def __call__(self, *args: str, check: bool = True, extra_env: dict[str, str] | None = None) -> str:
        cmd = ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"), *args]
        env = dict(self.env, **(extra_env or {}))
        return run(*cmd, check=check, env=env, timeout=120).stdout.strip()

    def attempt(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"), *args]
        return run(*cmd, check=False, env=dict(self.env, **(extra_env or {})), timeout=120)

    def ip(self, name: str) -> str:
        return self("inspect", name, "--format", f"{{{{.NetworkSettings.Networks.{self.network}.IPAddress}}}}")


@pytest.fixture(scope="module")
def podman(agent: Agent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman)")
    base = tmp_path_factory.mktemp("cgpodman")
    p = Podman(base, agent, "cgp" + agent.name[3:])
    root = base / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in run("/bin/busybox", "--list").stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "--root", str(base / "root"), "--runroot", str(base / "run"), "import",
                    "--change", 'CMD ["/bin/sh"]', "-", "localhost/cgbusybox"], stdin=tar.stdout, env=p.env,
                   check=True, capture_output=True)
    tar.wait()
    try:
        yield p
    finally:
        p.attempt("rm", "-a", "-f", "-t", "0")
        p.attempt("rmi", "-a", "-f")
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


SERVER = 'while true; do echo "hello from $(hostname)" | nc -l -p 8080; done'


def test_podman_run_gets_an_address_and_rm_leaves_nothing(podman: Podman, agent: Agent) -> None:
    before = agent.links()
    name = "cgpa" + agent.name[3:]
    podman("run", "-d", "--name", name, "--network", podman.network, "localhost/cgbusybox", "sleep", "3600")
    ip = podman.ip(name)
    (ep,) = [e for e in agent.endpoints() if e["ipv4"].startswith(ip + "/")]
    assert ep["origin"] == "cni" and ep["interface"] in agent.links()
    mac = podman("inspect", name, "--format", f"{{{{.NetworkSettings.Networks.{podman.network}.MacAddress}}}}")
    assert mac == ep["mac"]
    inside = podman("exec", name, "ip", "-4", "addr", "show", "eth0")
    assert ip in inside
    gateway = ep["gateway4"]
    podman("exec", name, "ping", "-c", "1", "-W", "2", gateway)
    podman("rm", "-f", "-t", "0", name)
    assert all(e["id"] != ep["id"] for e in agent.endpoints())
    assert all(a != ip for a, _, _ in agent.allocations())
    assert ep["interface"] not in agent.links()
    assert set(agent.links()) - set(before) <= {f"cg_{agent.name}"}  # only the network's host device stays


def test_published_port_through_portmap(podman: Podman, agent: Agent) -> None:
    name = "cgpw" + agent.name[3:]
    port = 18000 + int(agent.name[3:5], 16)
    try:
        podman("run", "-d", "--name", name, "--network", podman.network, "-p", f"{port}:8080",
               "localhost/cgbusybox", "sh", "-c", SERVER)
        answer = wait_until(lambda: run("nc", "-w", "2", "127.0.0.1", str(port), check=False, input="").stdout,
                            20, "the published port")
        assert "hello from" in answer
    finally:
        podman.attempt("rm", "-f", "-t", "0", name)


def test_podman_and_docker_containers_share_one_policy(podman: Podman, agent: Agent, scene: Scene) -> None:
    net = scene.network()
    backend = scene.run(net, "-l", "app=backend", cmd=("sh", "-c", SERVER))
    backend_ip = scene.ip(backend, net)
    eid = scene.d.inspect(backend)["NetworkSettings"]["Networks"][net]["EndpointID"]
    wait_until(lambda: agent.json("endpoint", "get", eid)["labels"], 20, "backend labels")
    names = {"frontend": "cgpf" + agent.name[3:], "other": "cgpo" + agent.name[3:]}
    try:
        for app, name in names.items():
            podman("run", "-d", "--name", name, "--network", podman.network, "localhost/cgbusybox", "sleep", "3600",
                   extra_env={"CNI_ARGS": f"CELLGATE_LABELS=app:{app}"})
            ip = podman.ip(name)
            ep = next(e for e in agent.endpoints() if e["ipv4"].startswith(ip + "/"))
            assert f"cni:app={app}" in ep["labels"]

        def reach(app: str) -> bool:
            out = podman.attempt("exec", names[app], "nc", "-w", "1", backend_ip, "8080")
            return "hello from" in out.stdout

        assert wait_until(lambda: reach("frontend") and reach("other"), 20, "open network")
        rule = [{"labels": [{"key": "name", "value": "mixed"}],
                 "endpointSelector": {"matchLabels": {"app": "backend"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"cni:app": "frontend"}}],
                              "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}]
        path = Path(agent.base) / "mixed.json"
        path.write_text(json.dumps(rule))
        agent.cli("policy", "import", str(path))
        assert reach("frontend")
        assert not reach("other")
        # and the Docker side sees the podman side by identity too (replies pass, new flows are checked)
        trace = agent.json("policy", "trace", "--src", "cni:app=other", "--dst-endpoint", eid, "--dport", "8080/tcp")
        assert trace["verdict"] == "DENIED"
    finally:
        agent.cli("policy", "delete", "--all", check=False)
        for name in names.values():
            podman.attempt("rm", "-f", "-t", "0", name)
    assert not any(e["origin"] == "cni" for e in agent.endpoints())
