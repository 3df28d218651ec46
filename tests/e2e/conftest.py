"""Fixtures of the e2e tier: one private dockerd per session, one agent per module."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Dockerd, Scene, docker_agent, run
from tests.etcd_server import EtcdServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reasons = set()
    no_dockerd = shutil.which("dockerd") is None
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            reason = None
            if os.geteuid() != 0:
                reason = "e2e tests need root"
            elif no_dockerd and "dockerd" in getattr(item, "fixturenames", ()):  # the CNI tiers need none
                reason = "dockerd is not installed (apt-get install docker.io)"
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
                reasons.add(reason)
    for reason in sorted(reasons):
        print(f"\nSKIPPING (part of) the e2e tier: {reason}", file=sys.stderr)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    root = Path(tempfile.mkdtemp(prefix="cgd", dir="/tmp"))
    d = Dockerd(root)
    d.start()
    try:
        yield d
    finally:
        with contextlib.suppress(Exception):
            ids = d("ps", "-aq", "--filter", "name=cg").split()
            if ids:
                d("rm", "-f", *ids)
        d.stop()
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True, check=False)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = "cgtest/busybox:1"
    if dockerd.attempt("image", "inspect", name).returncode == 0:
        return name
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    (root / "tmp").mkdir()
    (root / "etc").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in run("/bin/busybox", "--list").stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", name], stdin=tar.stdout,
                   env=dockerd.env, check=True, capture_output=True)
    tar.wait()
    return name


@pytest.fixture(scope="module")
def agent(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with docker_agent(dockerd, tmp_path_factory) as a:
        yield a


@pytest.fixture
def scene(dockerd: Dockerd, agent: Agent, image: str) -> Iterator[Scene]:
    with Scene(dockerd, agent, image) as s:
        yield s


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd of the test's own (data in tmp_path, free ports), stopped by PID afterwards."""
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture(scope="module")
def etcd_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd shared by a module's tests (give each test its own key prefix)."""
    with EtcdServer(tmp_path_factory.mktemp("etcd") / "etcd") as server:
        yield server
