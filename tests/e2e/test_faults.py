"""The fault tier: the agent SIGKILLed (failpoint action `exit`) at every step of endpoint create and
delete, policy import and CNI ADD/DEL, and the faults of the world around it: a full or read-only
state dir, bpffs pins removed, a host veth deleted by hand, dockerd restarted, etcd stopped and
compacted, the L7 proxy killed. After each, the oracle (tests/e2e/oracle.py) holds.

Every test takes a baseline first, causes its fault while denied probes run in the background,
measures how soon allowed probes connect again once the agent is ready, waits for a consistent
state, undoes what it made and compares the resource counts with the baseline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cni_support import Cni, Namespaces, Processes, endpoint_id
from tests.e2e.harness import Agent, Dockerd, Scene, docker_agent, run, wait_until
from tests.e2e.oracle import TIMES, Oracle, Probe, Prober, Target, Watch, allowed_again, assert_denied

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXIT = 137  # what a failpoint's `exit` ends the agent with (as SIGKILL would)
# reconciliation with a short grace: what Docker forgot (a call lost in a crash, a DeleteEndpoint the
# state dir refused) goes within seconds
GRACE = ("--reconcile-grace", "3", "--docker-resync", "5")

# Failpoints by the operation that reaches them, in the order the operation passes them.
DOCKER_RUN = (
    "docker.request_address.before_reply",  # IPAM: reserved and persisted, Docker not told
    "endpoint.create.address_bound",  # CreateEndpoint: the address bound to the endpoint
    "endpoint.create.persisted",  # the endpoint document written
    "kernel.add.veth",  # the veth made, no map entry yet
    "kernel.add.address-entry",  # map entries written, no programs attached
    "endpoint.create.maps_written",  # everything in the kernel
    "docker.create_endpoint.before_reply",
    "endpoint.update.persisted",  # Join: the sandbox persisted, the kernel not told
    "docker.join.before_reply",
    "endpoint.labels.updated",  # labels from the events stream: the new identity in force
)
DOCKER_RM = (
    "endpoint.update.persisted",  # Leave: persisted, the kernel not told
    "docker.leave.before_reply",
    "endpoint.delete.persisted",  # DeleteEndpoint: the document gone, nothing else yet
    "kernel.remove.address-entry",  # the kernel side half gone
    "kernel.remove.veth",  # the kernel side gone (routes, neighbours, programs go with the veth)
    "endpoint.delete.kernel_removed",  # its identity still held
    "docker.delete_endpoint.before_reply",
    "docker.release_address.before_reply",  # IPAM: released, Docker not told
)
POLICY_IMPORT = (
    "policy.import.parsed",
    "policy.change.maps_written",  # the maps enforce the new rules, the repository does not hold them
    "policy.change.persisted",  # committed, the realized revision not bumped
    "policy.import.revision_bumped",  # everything done, no reply
)
CNI_ADD = (
    "cni.add.network_ready",  # the CNI network made by this ADD
    "cni.add.address_reserved",
    "endpoint.create.persisted",
    "cni.add.before_attach",  # the endpoint complete, the interface not configured in the namespace
    "cni.add.after_attach",  # everything done, no result
)
CNI_DEL = (
    "kernel.remove.veth",
    "cni.del.endpoint_removed",  # the endpoint gone, its address still allocated
    "cni.del.released",  # everything done, no reply
)
ELSEWHERE = {"kernel.veth.created": "tests/e2e/test_cli_and_cleanup.py"}  # failpoints other modules exercise

SERVE = ("sh", "-c", "httpd -p 80 -h /tmp && httpd -p 81 -h /tmp && exec sleep 86400")  # busybox httpd forks
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/tmp")


def rule(name: str, subject: str, peer: str, port: int) -> dict[str, Any]:
    """`subject` accepts TCP/`port` from `peer` (and, being selected, nothing else)."""
    return {
        "labels": [{"key": "name", "value": name}],
        "endpointSelector": {"matchLabels": {"app": subject}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"app": peer}}],
                "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}],
            }
        ],
    }


P0 = [rule("cgf-p0", "cgfsrv", "cgfcli", 80)]  # in force throughout
P1 = [rule("cgf-p1", "cgfsrv", "cgfbad", 81)]  # what the policy tests import


# -- the world of the module's tests ----------------------------------------------------------


class World:
    """An agent with a network, a server (`srv`, ports 80 and 81), a client (`cli`) allowed to
    srv:80 by P0, and a client (`bad`) allowed nothing; CNI attachments in namespaces of its own.

    Allowed: cli -> srv:80. Denied: cli -> srv:81, bad -> srv:80, bad -> srv:81 (the last one is
    what P1 allows). The containers restart with dockerd.
    """

    def __init__(self, dockerd: Dockerd, agent: Agent, image: str, workdir: Path) -> None:
        self.d, self.agent, self.image, self.workdir = dockerd, agent, image, workdir
        self.scene = Scene(dockerd, agent, image)
        self.namespaces = Namespaces()
        self.processes = Processes()
        self.cni = Cni(agent, self.namespaces)  # type: ignore[arg-type]  # needs only the API socket
        self.probers: dict[str, Prober] = {}
        subnet = list(ipaddress.ip_network(agent.v4).subnets(new_prefix=24))[-1]  # given: `docker run --ip` works
        self.net = self.scene.network("--subnet", str(subnet))
        self.srv = self.scene.run(self.net, "-l", "app=cgfsrv", "--restart", "always", cmd=SERVE)
        self.cli = self.scene.run(self.net, "-l", "app=cgfcli", "--restart", "always")
        self.bad = self.scene.run(self.net, "-l", "app=cgfbad", "--restart", "always")
        self.policy_import(P0)
        self.target = Target.of(agent, dockerd, self.namespace_names)
        self.oracle = Oracle(self.target)
        self._n = 0
        self._began = time.monotonic()
        self.refresh()
        wait_until(lambda: all(p.connects() for p in self.allowed), 20, "the allowed probes to connect")
        assert_denied(self.denied)

    def note(self, what: str) -> None:
        """A timestamped line for the test's captured output (where a slow or failing test spent its time)."""
        print(f"{time.monotonic() - self._began:7.2f}s {what}", flush=True)

    def close(self) -> None:
        for prober in self.probers.values():
            prober.close()
        try:
            self.cni.close()
        finally:
            self.processes.close()
            self.namespaces.close()
            self.scene.close()

    def namespace_names(self) -> list[str]:
        """Network namespaces of this world (mounted, so alive): its containers' in dockerd's exec
        root, and its own (`ip netns add`)."""
        docker, mine = str(self.d.root / "exec" / "netns") + "/", f"/run/netns/cg{self.namespaces.tag}"
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return sorted({p for p in points if p.startswith((docker, mine))})

    def name(self) -> str:
        self._n += 1
        return f"cgf{self.scene.tag}x{self._n}"

    def pid(self, container: str) -> int:
        return int(self.d.inspect(container)["State"]["Pid"])

    def refresh(self) -> None:
        """Probers in the clients' namespaces (again, after containers restarted), and the probes."""
        for c in (self.srv, self.cli, self.bad):
            wait_until(lambda c=c: self.d.inspect(c)["State"]["Running"], 60, f"{c} to run")
        wait_until(lambda: all(e["labels"] for e in self.target.get("/v1/endpoints") if e["sandbox"]), 20, "labels")
        for prober in self.probers.values():
            prober.close()
        self.probers = {k: Prober.in_process_netns(k, self.pid(c)) for k, c in (("cli", self.cli), ("bad", self.bad))}
        srv = self.scene.ip(self.srv, self.net)
        cli, bad = self.probers["cli"], self.probers["bad"]
        self.allowed = [Probe(cli, srv, 80, "cli -> srv:80")]
        self.p1 = Probe(bad, srv, 81, "bad -> srv:81 (allowed by P1 only)")
        self.always_denied = [Probe(cli, srv, 81, "cli -> srv:81"), Probe(bad, srv, 80, "bad -> srv:80")]
        self.denied = [*self.always_denied, self.p1]

    # -- the agent --------------------------------------------------------------------------

    def arm(self, point: str) -> None:
        """Restart the agent (SIGKILL: the quickest way, and a fault it must take anyway) with
        `point` armed to end it there, as SIGKILL would."""
        self.agent.signal(signal.SIGKILL)
        self.agent.start(failpoints=f"{point}=exit")

    def killed(self, point: str) -> None:
        code = self.agent.exited(timeout=60)
        assert code == EXIT, f"the agent ended with {code}, not at the failpoint {point}"
        assert f"failpoint {point}: exit" in self.agent.log.read_text()

    def restart(self) -> float:
        """Start the agent (unarmed); the moment it is ready."""
        self.agent.start()
        return time.monotonic()

    def policy_import(self, rules: list[dict[str, Any]], check: bool = True) -> subprocess.CompletedProcess[str]:
        path = self.workdir / f"policy-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(rules))
        out = self.agent.cli("policy", "import", str(path), "-o", "json", check=check)
        if check:
            self.agent.cli("policy", "wait", str(json.loads(out.stdout)["revision"]))
        return out

    def rules(self) -> set[str]:
        """The names (label `name`) of the rules in force."""
        return {
            lb.split("=", 1)[1]
            for r in self.target.get("/v1/policy")["rules"]
            for lb in r["labels"]
            if lb.split(":", 1)[-1].startswith("name=")
        }

    def reset(self) -> None:
        """After a test, whatever it did: the agent running, P0 alone in force, no container but the
        world's own."""
        if self.agent.proc is None or self.agent.proc.poll() is not None:
            self.agent.proc = None
            self.agent.start()
        extra = [c for c in self.scene.containers if c not in (self.srv, self.cli, self.bad)]
        if extra:
            self.rm(*extra)
        extra = self.rules() - {"cgf-p0"}
        for name in extra:
            self.agent.cli("policy", "delete", "--labels", f"name={name}")
        if "cgf-p0" not in self.rules():
            self.policy_import(P0)

    # -- Docker and CNI ---------------------------------------------------------------------

    def docker_run(self, name: str, *opts: str) -> subprocess.Popen[str]:
        """`docker run` of an httpd container named `name`, in the background."""
        self.scene.containers.append(name)
        cmd = [
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--label",
            f"cgtest={self.agent.name}",
            "-l",
            "app=cgfnew",
            "--network",
            self.net,
            *opts,
            self.image,
            *HTTPD,
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.d.env)

    def reachable(self, container: str, since: float, what: str) -> None:
        """cli reaches `container`:80 within RECOVERY seconds of `since`."""
        allowed_again(
            [Probe(self.probers["cli"], self.scene.ip(container, self.net), 80, f"cli -> {container}:80")], since, what
        )

    def rm(self, *containers: str) -> None:
        self.d("rm", "-f", *containers)
        for c in containers:
            self.scene.containers.remove(c)

    def cni_network(self) -> tuple[str, dict[str, Any]]:
        net = f"cgf{self.namespaces.tag}c{self._n}"
        self._n += 1
        return net, self.cni.conf(net, "1.0.0")

    def cni_serve(self, ns: Any) -> str:
        """An httpd on port 80 in namespace `ns` (the host's busybox); the address cli reaches it at."""
        self.processes.start("ip", "netns", "exec", ns.name, "/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/tmp")
        info = ns.interface("eth0")
        assert info is not None
        return next(a.split("/")[0] for a in info["addresses"] if ":" not in a)


@pytest.fixture(scope="module")
def agent(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with docker_agent(dockerd, tmp_path_factory, "cgf", GRACE) as a:
        yield a


@pytest.fixture(scope="module")
def world(dockerd: Dockerd, agent: Agent, image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(dockerd, agent, image, tmp_path_factory.mktemp("cgfworld"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test leaves the module's world as the next test expects it."""
    yield
    if "world" in request.fixturenames:
        request.getfixturevalue("world").reset()


@pytest.fixture(scope="module", autouse=True)
def recovery_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of the module: how long allowed probes took to connect again, per fault."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and TIMES:
        reporter.write_line("")
        reporter.write_line("allowed probes connected again after (seconds from the agent being ready):")
        for what, took in TIMES:
            reporter.write_line(f"  {took:5.2f}  {what}")


def test_every_failpoint_in_the_code_is_exercised() -> None:
    """Each `hit("name")` in the agent is armed by a test here (or by the module named in ELSEWHERE)."""
    named = set()
    for package in ("plugin", "datapath", "ipam"):
        for path in (ROOT / package).rglob("*.py"):
            named.update(re.findall(r"""\bhit\(\s*"([a-z0-9_.-]+)"\s*\)""", path.read_text()))
    covered = {*DOCKER_RUN, *DOCKER_RM, *POLICY_IMPORT, *CNI_ADD, *CNI_DEL, *ELSEWHERE}
    assert named - covered == set(), f"failpoints no test arms: {sorted(named - covered)}"
    kernel = {p for p in covered if p.startswith("kernel.") and p not in ELSEWHERE}
    assert {p for p in covered if not p.startswith("kernel.")} <= named | set(ELSEWHERE), sorted(covered - named)
    assert all(re.fullmatch(r"kernel\.(add|change|remove)\.[a-z-]+", p) for p in kernel), kernel


def test_docker_resyncs_hold_no_more_descriptors(world: World) -> None:
    """Following Docker (its events stream ends at every resync, `--docker-resync`) costs no
    descriptor per resync."""
    base = world.oracle.baseline()

    def synced() -> float:
        return float(world.target.get("/v1/status")["docker"]["last_sync"])

    for _ in range(3):
        last = synced()
        wait_until(lambda last=last: synced() > last, 20, "a resync")
    world.oracle.back_to(base)


# -- SIGKILL at every step --------------------------------------------------------------------


@pytest.mark.parametrize("point", DOCKER_RUN)
def test_sigkill_during_docker_run(world: World, point: str) -> None:
    world.note("baseline")
    base = world.oracle.baseline()
    world.note("arm")
    world.arm(point)
    name = world.name()
    with Watch(world.denied):
        world.note("docker run")
        started = world.docker_run(name)
        world.killed(point)
        world.note("killed")
        ready = world.restart()
        world.note("restarted")
        allowed_again(world.allowed, ready, f"docker run, {point}")
        _, err = started.communicate(timeout=120)
        world.note(f"docker run returned {started.returncode}: {err.strip()}")
    if started.returncode == 0:  # Docker's retry was served: the container has its network
        world.reachable(name, time.monotonic(), f"the new container, {point}")
    else:  # Docker gave up (a retried call came without its body) and rolled back
        assert err.strip(), "docker run failed without saying why"
    world.oracle.consistent(cni=set())
    world.note("consistent")
    assert_denied(world.denied)
    world.rm(name)
    world.oracle.consistent(cni=set())
    world.note("removed, consistent")
    world.oracle.back_to(base)
    world.note("back to the baseline")


@pytest.mark.parametrize("point", DOCKER_RM)
def test_sigkill_during_docker_rm(world: World, point: str) -> None:
    base = world.oracle.baseline()
    name = world.name()
    started = world.docker_run(name)
    assert started.wait(timeout=120) == 0, started.communicate()
    world.reachable(name, time.monotonic(), "a fresh container")
    world.arm(point)
    with Watch(world.denied):
        rm = subprocess.Popen(
            ["docker", "rm", "-f", name], env=world.d.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        world.killed(point)
        ready = world.restart()
        allowed_again(world.allowed, ready, f"docker rm, {point}")
        out, _ = rm.communicate(timeout=120)
    assert rm.returncode == 0, out  # Docker removes the container whatever its driver said
    world.scene.containers.remove(name)
    world.oracle.consistent(cni=set())
    assert_denied(world.denied)
    world.oracle.back_to(base)


@pytest.mark.parametrize("point", POLICY_IMPORT)
def test_sigkill_during_policy_import(world: World, point: str) -> None:
    base = world.oracle.baseline()
    world.arm(point)
    with Watch(world.always_denied):  # P1 may or may not be in force at any moment of the crash
        out = world.policy_import(P1, check=False)
        assert out.returncode != 0, out.stdout  # the agent died before answering
        world.killed(point)
        ready = world.restart()
        allowed_again(world.allowed, ready, f"policy import, {point}")
        imported = "cgf-p1" in world.rules()
        if imported:  # the import was committed: what the repository holds is enforced
            allowed_again([world.p1], ready, f"the imported rule, {point}")
        else:
            assert_denied([world.p1])
    status = world.target.get("/v1/status")["policy"]
    assert status["realized"] == status["revision"], status
    world.oracle.consistent(cni=set())
    if imported:
        world.agent.cli("policy", "delete", "--labels", "name=cgf-p1")
    assert_denied(world.denied)
    world.oracle.back_to(base)


def killed_in(world: World, point: str, call: Callable[[], object], what: str) -> None:
    """`call` with `point` armed fails (the agent died in it: an error, not a hang); the agent is
    started again and the allowed probes connect within RECOVERY; denied ones never did."""
    world.arm(point)
    with Watch(world.denied):
        call()
        world.killed(point)
        ready = world.restart()
        allowed_again(world.allowed, ready, f"{what}, {point}")


@pytest.mark.parametrize("point", CNI_ADD)
def test_sigkill_during_cni_add(world: World, point: str) -> None:
    base = world.oracle.baseline()
    ns = world.namespaces.new()
    net, conf = world.cni_network()
    cid = world.cni.cid()
    killed_in(world, point, lambda: world.cni.add(conf, cid, ns.path).error(), "CNI ADD")
    world.cni.delete(conf, cid, ns.path).empty()  # what a runtime does after a failed ADD
    world.oracle.consistent(cni=set())
    assert ns.links() == ["lo"]
    world.cni.add(conf, cid, ns.path).result()  # and the ADD again succeeds
    world.oracle.consistent(cni={endpoint_id(cid, "eth0")})
    address = world.cni_serve(ns)
    allowed_again(
        [Probe(world.probers["cli"], address, 80, "cli -> CNI endpoint:80")],
        time.monotonic(),
        f"the CNI endpoint added again, {point}",
    )
    world.cni.delete(conf, cid, ns.path).empty()
    world.agent.cli("network", "rm", net)
    world.namespaces.delete(ns)
    world.oracle.consistent(cni=set())
    world.oracle.back_to(base)


@pytest.mark.parametrize("point", CNI_DEL)
def test_sigkill_during_cni_del(world: World, point: str) -> None:
    base = world.oracle.baseline()
    ns = world.namespaces.new()
    net, conf = world.cni_network()
    cid = world.cni.cid()
    world.cni.add(conf, cid, ns.path).result()
    killed_in(world, point, lambda: world.cni.delete(conf, cid, ns.path).error(), "CNI DEL")
    world.cni.delete(conf, cid, ns.path).empty()  # the runtime retries its DEL
    world.oracle.consistent(cni=set())
    assert ns.links() == ["lo"]
    world.agent.cli("network", "rm", net)
    world.namespaces.delete(ns)
    world.oracle.back_to(base)


# -- the world around the agent ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small(dockerd: Dockerd, image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A second agent whose state dir is a small tmpfs of its own (`agent.state_mount`)."""
    with docker_agent(dockerd, tmp_path_factory, "cgfs", GRACE, state_size="2m") as a:
        w = World(dockerd, a, image, tmp_path_factory.mktemp("cgfsmall"))
        try:
            yield w
        finally:
            w.close()


def refused(w: World, reason: str) -> None:
    """A new network, a container, a policy and a CNI attachment are each refused with `reason` in the
    error, and leave the agent's state, the kernel's maps and its links exactly as they were."""
    before = w.oracle.snapshot()
    net = f"cgn{w.scene.tag}r{w._n}"
    out = w.d.attempt("network", "create", "-d", w.agent.name, "--ipam-driver", w.agent.name, net)
    assert out.returncode != 0 and reason in out.stderr, out.stderr
    name = w.name()
    started = w.docker_run(name)
    _, err = started.communicate(timeout=120)
    assert started.returncode != 0 and reason in err, err
    out = w.policy_import(P1, check=False)
    assert out.returncode != 0 and reason in out.stderr, (out.stdout, out.stderr)
    ns = w.namespaces.new()
    _, conf = w.cni_network()
    cid = w.cni.cid()
    assert reason in w.cni.add(conf, cid, ns.path).error()["msg"]
    after = w.oracle.snapshot()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    w.cni.delete(conf, cid, ns.path).empty()  # the runtime's DEL after the failed ADD
    w.rm(name)
    w.namespaces.delete(ns)
    assert w.d.attempt("network", "inspect", net).returncode != 0


def served(w: World) -> None:
    """The same requests succeed (and are undone)."""
    net = w.scene.network()
    w.d("network", "rm", net)
    w.scene.networks.remove(net)
    name = w.name()
    started = w.docker_run(name)
    assert started.wait(timeout=120) == 0, started.communicate()
    w.reachable(name, time.monotonic(), "a container once the state dir took writes again")
    w.rm(name)
    w.policy_import(P1)
    allowed_again([w.p1], time.monotonic(), "a policy once the state dir took writes again")
    w.agent.cli("policy", "delete", "--labels", "name=cgf-p1")
    assert_denied([w.p1])
    ns = w.namespaces.new()
    cnet, conf = w.cni_network()
    cid = w.cni.cid()
    w.cni.add(conf, cid, ns.path).result()
    w.oracle.consistent(cni={endpoint_id(cid, "eth0")})
    w.cni.delete(conf, cid, ns.path).empty()
    w.agent.cli("network", "rm", cnet)
    w.namespaces.delete(ns)


@pytest.mark.parametrize(
    ("fault", "reason"), [("disk full", "No space left on device"), ("read-only", "Read-only file system")]
)
def test_state_dir_refuses_writes(small: World, fault: str, reason: str) -> None:
    """Requests fail with the file system's reason and change nothing; a container removed meanwhile
    leaves nothing behind; once writes work again, so does everything."""
    w, mount = small, small.agent.state_mount
    assert mount is not None
    base = w.oracle.baseline()
    victim = w.name()  # removed while the state dir refuses writes
    assert w.docker_run(victim).wait(timeout=120) == 0
    w.reachable(victim, time.monotonic(), "a fresh container")
    with Watch(w.denied):
        if fault == "disk full":
            mount.fill()
        else:
            mount.read_only()
        try:
            refused(w, reason)
            w.rm(victim)
        finally:
            mount.free() if fault == "disk full" else mount.writable()
    w.oracle.consistent(cni=set())
    served(w)
    w.oracle.consistent(cni=set())
    w.oracle.back_to(base)


def test_bpffs_pins_removed_behind_the_agents_back(world: World) -> None:
    """The running agent works on with its descriptors and pins everything again (its sweep), so a
    restart finds the maps and programs that run: the same revision, reused, no new maps beside the
    old ones (which the attached programs would keep using), and rules imported after it enforced."""
    base = world.oracle.baseline()
    revision = world.target.get("/v1/status")["datapath"]
    pins = sorted(world.agent.bpf.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    before = {str(p) for p in pins}
    assert pins
    with Watch(world.always_denied):
        for pin in pins:
            pin.rmdir() if pin.is_dir() else pin.unlink()
        name = world.name()
        assert world.docker_run(name).wait(timeout=120) == 0
        world.reachable(name, time.monotonic(), "a container made after the pins went")
        world.policy_import(P1)
        allowed_again([world.p1], time.monotonic(), "a rule imported after the pins went")
        world.agent.cli("policy", "delete", "--labels", "name=cgf-p1")
        assert_denied([world.p1])
        wait_until(lambda: {str(p) for p in world.agent.bpf.rglob("*")} == before, 15, "the pins to come back")
        world.agent.signal(signal.SIGKILL)
        ready = world.restart()
        allowed_again(world.allowed, ready, "a restart after the pins were removed")
        world.reachable(name, ready, "the container made meanwhile, after the restart")
        status = world.target.get("/v1/status")
        assert status["datapath"] == revision and status["datapath_reused"], status
        world.policy_import(P1)
        allowed_again([world.p1], time.monotonic(), "a rule imported after the restart")
        world.agent.cli("policy", "delete", "--labels", "name=cgf-p1")
        assert_denied([world.p1])
    world.rm(name)
    world.oracle.consistent(cni=set())
    world.oracle.back_to(base)


def test_host_veth_deleted_by_hand(world: World) -> None:
    """The endpoint goes with its veth, but not its address while Docker holds it for the container;
    restarting the container brings its network back."""
    base = world.oracle.baseline()
    name = world.name()
    assert world.docker_run(name).wait(timeout=120) == 0
    address = world.scene.ip(name, world.net)
    (ep,) = [e for e in world.agent.endpoints() if e["ipv4"].split("/")[0] == address]
    world.reachable(name, time.monotonic(), "a fresh container")
    with Watch(world.denied):
        run("ip", "link", "del", ep["interface"])
        wait_until(lambda: ep["id"] not in {e["id"] for e in world.agent.endpoints()}, 15, "the sweep to notice")
        clash = world.name()
        started = world.docker_run(clash, "--ip", address)
        _, err = started.communicate(timeout=120)
        assert started.returncode != 0 and address in err, f"{address} was handed out again: {err}"
        world.rm(clash)
        world.d("restart", "-t", "1", name)
        world.reachable(name, time.monotonic(), "a container whose veth was deleted, restarted")
    world.oracle.consistent(cni=set())
    world.rm(name)
    world.oracle.consistent(cni=set())
    world.oracle.back_to(base)


@contextlib.contextmanager
def l7_web(world: World) -> Iterator[Any]:
    """tests/e2e/test_l7.py's scene (backend, frontend, other) on a network of its own, under its HTTP
    policy (frontend may GET /public/...), removed afterwards."""
    from tests.e2e.test_l7 import Web, load

    web = Web(world.scene, world.agent)
    try:
        load(world.agent, "l7-http.yaml")
        yield web
    finally:
        world.agent.cli("policy", "delete", "--labels", "name=l7-public-get", check=False)
        world.rm(*web.names.values())
        world.d("network", "rm", web.net)
        world.scene.networks.remove(web.net)


def test_l7_proxy_killed(world: World) -> None:
    """While the proxy is down (and its supervisor cannot bring it back) the flows its rules cover
    fail closed; once it is back, allowed requests are served again and denied ones stay denied."""
    from tests.e2e.test_l7 import proxy_denied

    with l7_web(world) as web:
        base = world.oracle.baseline()
        assert web.curl("frontend", "/public/x") == (200, "served:public/x\n")
        assert proxy_denied(*web.curl("frontend", "/private"))
        proxy = world.agent.state / "proxy"
        old = int((proxy / "proxy.pid").read_text())
        port = int((proxy / "port").read_text())
        agent_pid = world.target.pid()
        with Watch(world.denied):
            os.kill(agent_pid, signal.SIGSTOP)  # the supervisor restarts a dead proxy at once: not now
            try:
                os.kill(old, signal.SIGKILL)
                wait_until(lambda: not listening(port), 10, "the proxy to be gone")
                for path in ("/public/x", "/private"):
                    assert web.curl("frontend", path, timeout=1) == (0, ""), f"{path} answered without a proxy"
            finally:
                os.kill(agent_pid, signal.SIGCONT)
            since = time.monotonic()
            wait_until(lambda: int((proxy / "proxy.pid").read_text() or 0) != old, 10, "a new proxy")
            allowed_again([HttpProbe(web, "/public/x")], since, "the L7 proxy killed")
        assert proxy_denied(*web.curl("frontend", "/private"))
        world.oracle.consistent(cni=set())
        world.oracle.back_to(base)


def test_bpffs_pins_removed_while_the_agent_is_down(world: World) -> None:
    """A start without pins makes new maps, so a new revision: every endpoint's programs are replaced
    (rules imported after it are enforced), and the L7 proxy it adopts follows the new conntrack map."""
    from tests.e2e.test_l7 import proxy_denied

    with l7_web(world) as web:
        base = world.oracle.baseline()
        revision = world.target.get("/v1/status")["datapath"]
        with Watch(world.always_denied):
            world.agent.signal(signal.SIGKILL)
            for pin in sorted(world.agent.bpf.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                pin.rmdir() if pin.is_dir() else pin.unlink()
            ready = world.restart()
            allowed_again([*world.allowed, HttpProbe(web, "/public/x")], ready, "a start without pins")
            assert world.target.get("/v1/status")["datapath"] != revision  # other maps, other programs
            assert proxy_denied(*web.curl("frontend", "/private"))
            world.policy_import(P1)
            allowed_again([world.p1], time.monotonic(), "a rule imported after a start without pins")
            world.agent.cli("policy", "delete", "--labels", "name=cgf-p1")
            assert_denied([world.p1])
        world.oracle.consistent(cni=set())
        world.oracle.back_to(base)


@dataclass(frozen=True)
class HttpProbe:
    """An allowed HTTP request through the L7 proxy (what `allowed_again` asks of a probe)."""

    web: Any
    path: str

    def connects(self, timeout: float = 1.0) -> bool:
        return bool(self.web.curl("frontend", self.path, timeout=timeout)[0] == 200)

    def __str__(self) -> str:
        return f"frontend GET {self.path}"


def listening(port: int) -> bool:
    """Whether anything listens on TCP `port` in this namespace (read from /proc: no connection made)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        if any(f[1].endswith(wanted) and f[3] == "0A" for f in rows):
            return True
    return False


def test_dockerd_restarted(world: World) -> None:
    """Without live-restore: a container without a restart policy dies with its endpoint and address;
    the ones with one come back and are reached again, under the same policy."""
    base = world.oracle.baseline()
    plain = world.name()
    assert world.docker_run(plain, "--restart", "no").wait(timeout=120) == 0
    world.d.restart()
    for c in (world.srv, world.cli, world.bad):
        wait_until(lambda c=c: world.d.inspect(c)["State"]["Running"], 60, f"{c} to run again")
    since = time.monotonic()
    world.refresh()
    allowed_again(world.allowed, since, "dockerd restarted")
    assert_denied(world.denied)
    world.oracle.consistent(cni=set())
    world.rm(plain)
    world.oracle.back_to(base)


# -- the cluster: etcd stopped and compacted --------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    from tests.e2e.test_cluster_faults import TTL, running

    yield from running(TTL)


def test_etcd_stopped_and_compacted(pair: tuple[Any, Any], tmp_path: Path) -> None:
    """etcd stops (the nodes keep enforcing from what they know) and comes back compacted past what
    the nodes' watches saw: they relist, keep their endpoints and identities, and see new ones."""
    from tests.e2e.test_cluster import BACKEND_TCP80_FROM_FRONTEND, policy, visible_everywhere

    c, scene = pair
    a, b = c.node(1), c.node(2)
    fe, ot = scene.endpoint(a, "q1", "frontend"), scene.endpoint(a, "q2", "other")
    be = scene.endpoint(b, "q3", "backend")
    visible_everywhere(c, fe, ot, be)
    policy(c, b, BACKEND_TCP80_FROM_FRONTEND, tmp_path)
    probers = {ep.name: Prober.in_netns(ep.name, ep.netns) for ep in (fe, ot)}
    try:
        allowed = [Probe(probers["q1"], be.ipv4, 80, "frontend -> backend:80")]
        denied = [
            Probe(probers["q2"], be.ipv4, 80, "other -> backend:80"),
            Probe(probers["q1"], be.ipv4, 81, "frontend -> backend:81"),
        ]
        wait_until(lambda: all(p.connects() for p in allowed), 20, "the allowed probe")
        assert_denied(denied)
        oracles = {n.name: Oracle(Target.of_node(c, n)) for n in (a, b)}
        bases = {name: o.baseline() for name, o in oracles.items()}

        def attachments(node: Any) -> set[str]:
            return {endpoint_id(ep.cid, "eth0") for ep in c.endpoints if ep.node == node.name}

        with Watch(denied):
            c._etcd.stop()
            wait_until(lambda: not c.cli(a, "status")["kvstore"]["connected"], 15, "the nodes to notice")
            assert all(p.connects() for p in allowed)  # enforced from what the nodes know
            c._etcd.start()
            since = time.monotonic()
            c._etcd.compact()
            wait_until(lambda: all(c.cli(n, "status")["kvstore"]["connected"] for n in (a, b)), 15, "reconnects")
            allowed_again(allowed, since, "etcd back, compacted")
        late = scene.endpoint(a, "q4", "frontend")  # written after the compaction: every watch sees it
        visible_everywhere(c, late)
        with Prober.in_netns("q4", late.netns) as prober:
            allowed_again(
                [Probe(prober, be.ipv4, 80, "a new frontend -> backend:80")],
                time.monotonic(),
                "a new endpoint after the compaction",
            )
        assert_denied(denied)
        c.remove_endpoint(late)
        for node in (a, b):
            oracles[node.name].consistent(cni=attachments(node))
            oracles[node.name].back_to(bases[node.name])
    finally:
        for prober in probers.values():
            prober.close()
