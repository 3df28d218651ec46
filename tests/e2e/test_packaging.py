"""Packaging: the agent image (Dockerfile) and the Docker managed plugin, run by the private dockerd.

Both come from plugin/managed/build.sh (`make image`, `make plugin`); its Debian rootfs is cached in
/var/cache/cellgate, so only the first run on a machine spends minutes on mmdebstrap. Each test uses
a unique `cg…` instance with its own ranges, and removes what it made.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from plugin.managed import driver_name
from tests.e2e.harness import CELLGATE, Dockerd, Scene, run, unique_ranges, wait_until

ROOT = Path(__file__).resolve().parents[2]
BUILD = ["bash", str(ROOT / "plugin/managed/build.sh")]

if shutil.which("mmdebstrap") is None:
    print("\nSKIPPING tests/e2e/test_packaging.py: mmdebstrap is missing (make setup installs it)", file=sys.stderr)
    pytestmark = pytest.mark.skip(reason="mmdebstrap is missing (make setup installs it)")


def build(dockerd: Dockerd, *args: str) -> str:
    """build.sh against the private dockerd; its last output line (the image or plugin name)."""
    env = dict(dockerd.env, PYTHON=sys.executable)
    return run(*BUILD, *args, env=env, timeout=1500).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def agent_image(dockerd: Dockerd) -> Iterator[str]:
    tag = f"cgtest/cellgate:{secrets.token_hex(3)}"
    assert build(dockerd, "image", tag) == tag
    yield tag
    dockerd.attempt("image", "rm", "-f", tag)


# Reconciliation runs every second and judges after 3 s, so a network Docker lists under another
# driver name than the agent expects (a managed plugin is NAME:latest) would be gone by the end.
QUICK_RECONCILE = {"CELLGATE_DOCKER_RESYNC": "1", "CELLGATE_RECONCILE_GRACE": "3"}


def full_privilege() -> bool:
    """--privileged asks for every capability; some sandboxes bound the set (e.g. no CAP_SYS_RESOURCE)."""
    bound = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("CapBnd:")), 16)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    return bound & ((1 << (last + 1)) - 1) == (1 << (last + 1)) - 1


class Instance:
    """A cellgate instance name with its ranges and host-side state and API directories."""

    def __init__(self, base: Path, api_in_state: bool = False) -> None:
        self.name = "cg" + secrets.token_hex(3)
        self.v4, self.v6, _ = unique_ranges()
        self.state = base / "state"
        self.rundir = base / "run"
        self.state.mkdir()
        self.rundir.mkdir()
        self.api = (self.state if api_in_state else self.rundir) / f"{self.name}.sock"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(CELLGATE, *args, "--socket", str(self.api), check=check)

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def cleanup(self) -> None:
        run(CELLGATE, "cleanup", "--name", self.name, "--socket", str(self.api), "--state-dir",
            str(self.state), "--bpf-dir", f"/sys/fs/bpf/{self.name}", check=False)


def exercise(dockerd: Dockerd, image: str, inst: Instance, driver: str, tmp: Path) -> None:
    """A network of `driver`, two containers talking, then a policy denying one port enforced."""
    wait_until(lambda: inst.cli("status", check=False).returncode == 0, 60, f"{inst.name} to serve its API")
    scene = Scene(dockerd, SimpleNamespace(name=driver), image)  # type: ignore[arg-type]
    try:
        net = scene.network()
        assert dockerd.inspect(net)["Driver"] == driver
        script = ("while true; do echo a | nc -l -p 8080; done & "
                  "while true; do echo b | nc -l -p 8081; done")
        server = scene.run(net, "-l", "app=cgsrv", cmd=("sh", "-c", script))
        client = scene.run(net, "-l", "app=cgcli")
        address = scene.ip(server, net)
        assert scene.tcp(client, address, 8080).strip() == "a"
        assert scene.tcp(client, address, 8081).strip() == "b"
        eid = dockerd.inspect(server)["NetworkSettings"]["Networks"][net]["EndpointID"]
        wait_until(lambda: "container:app=cgsrv" in inst.json("endpoint", "get", eid)["labels"], 30,  # type: ignore[index]
                   "the server's labels")
        rule = tmp / "policy.yaml"
        rule.write_text(
            "- endpointSelector: {matchLabels: {app: cgsrv}}\n"
            "  ingress:\n"
            "  - fromEndpoints: [{matchLabels: {app: cgcli}}]\n"
            "    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n")
        out = json.loads(inst.cli("policy", "import", str(rule), "-o", "json").stdout)
        inst.cli("policy", "wait", str(out["revision"]))
        assert scene.tcp(client, address, 8080).strip() == "a"
        denied = scene.exec(client, "nc", "-w", "2", address, "8081", check=False)
        assert denied.stdout.strip() == "", "TCP/8081 must be denied by the policy"
        nets = {n["id"] for n in inst.json("network", "list")}  # type: ignore[attr-defined]
        assert dockerd.inspect(net)["Id"] in nets, "reconciliation must recognise the network as Docker's"
    finally:
        scene.close()


def test_agent_image_runs_privileged_with_host_network(dockerd: Dockerd, agent_image: str, image: str,
                                                       tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    container = f"{inst.name}-agent"
    mounts = [
        "/sys/fs/bpf:/sys/fs/bpf", "/lib/modules:/lib/modules:ro", "/usr/src:/usr/src:ro",
        f"{inst.state}:/var/lib/{inst.name}", f"{inst.rundir}:/var/run/{inst.name}",
        "/run/docker/plugins:/run/docker/plugins", f"{dockerd.sock}:/var/run/docker.sock",
    ]
    env = {"CELLGATE_NAME": inst.name, "CELLGATE_IPV4_RANGE": inst.v4, "CELLGATE_IPV6_RANGE": inst.v6,
           **QUICK_RECONCILE}
    if full_privilege():
        privilege = ["--privileged"]
    else:  # what the agent needs, when this machine cannot grant every capability
        print("\nthe capability bounding set is partial: the agent container gets SYS_ADMIN, NET_ADMIN and"
              " IPC_LOCK without seccomp/AppArmor instead of --privileged", file=sys.stderr)
        privilege = ["--cap-add=SYS_ADMIN", "--cap-add=NET_ADMIN", "--cap-add=IPC_LOCK",
                     "--security-opt=seccomp=unconfined", "--security-opt=apparmor=unconfined"]
    Path("/run/docker/plugins").mkdir(parents=True, exist_ok=True)
    try:
        dockerd("run", "-d", "--name", container, *privilege, "--network", "host",
                *(f"-v={m}" for m in mounts), *(f"-e={k}={v}" for k, v in env.items()), agent_image)
        try:
            exercise(dockerd, image, inst, inst.name, tmp_path)
        except Exception:
            print(dockerd("logs", "--tail", "80", container, check=False), file=sys.stderr)
            raise
    finally:
        dockerd.attempt("stop", "-t", "20", container)
        dockerd.attempt("rm", "-f", container)
        inst.cleanup()


def test_managed_plugin(dockerd: Dockerd, agent_image: str, image: str, tmp_path: Path) -> None:
    inst = Instance(tmp_path, api_in_state=True)
    plugin = inst.name  # Docker calls it NAME:latest
    driver = driver_name(plugin)
    env = {"CELLGATE_IPV4_RANGE": inst.v4, "CELLGATE_IPV6_RANGE": inst.v6, **QUICK_RECONCILE}
    render = ["--source", f"/var/run/docker.sock={dockerd.sock}", "--source", f"/var/lib/{inst.name}={inst.state}",
              *(f"--env={k}={v}" for k, v in env.items())]
    try:
        assert build(dockerd, "plugin", plugin, agent_image, "--", *render) == plugin
        info = json.loads(dockerd("plugin", "inspect", plugin))[0]
        assert info["Name"] == driver and not info["Enabled"]
        dockerd("plugin", "enable", plugin, timeout=60)
        try:
            exercise(dockerd, image, inst, driver, tmp_path)
        except Exception:
            print(Path(dockerd.log).read_text()[-6000:], file=sys.stderr)
            raise
    finally:
        with contextlib.suppress(Exception):
            dockerd("plugin", "disable", "-f", plugin, timeout=60)
        dockerd.attempt("plugin", "rm", "-f", plugin)
        inst.cleanup()
