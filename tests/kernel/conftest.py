"""Fixtures of the kernel tier: one compiled datapath per test instance, and endpoints in netns.

Everything created here has a unique `cg…` name and is deleted by exact name in teardown,
whether the test passed or not; nothing else on the machine is touched. Endpoints start
with the init identity, which an empty policy map denies; every instance therefore starts
with the entries an agent without rules writes (allow-all for init, see `open_policy`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import random
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from datapath import identity as ids
from datapath import naming, plan
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint, Network
from datapath.policy import Repository, Rule, parse_rules
from datapath.policy.compile import Entries, PolicyKey, PolicyValue, compile_all

from .helpers import EventLog, is_root, link_exists, run

BPF_ROOT = Path("/sys/fs/bpf")


def _missing_capability() -> str | None:
    if not is_root():
        return "kernel tier needs root (BPF, netns, veth)"
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return f"kernel tier needs the BCC Python binding (python3-bpfcc): {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_capability()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config: pytest.Config) -> str | None:
    reason = _missing_capability()
    return f"kernel tier SKIPPED: {reason}" if reason else None


# -- addresses ----------------------------------------------------------------------------


class Subnets:
    """Hands out IPv4 /24 and IPv6 /64 pairs the host does not route yet (one per instance)."""

    def __init__(self) -> None:
        self._rng = random.Random(secrets.randbits(32))
        self._v6_prefix = f"fd63:67{self._rng.randrange(256):02x}"
        self._used: set[int] = set()

    def take(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
        routed = run("ip", "-4", "route", "show", "table", "all").stdout
        for _ in range(200):
            octet = self._rng.randrange(1, 255)
            net4 = ipaddress.IPv4Network(f"10.231.{octet}.0/24")
            if octet in self._used or f"10.231.{octet}." in routed:
                continue
            self._used.add(octet)
            return net4, ipaddress.IPv6Network(f"{self._v6_prefix}:{octet:x}::/64")
        raise AssertionError("no free 10.231.x.0/24 subnet for a test instance")


@pytest.fixture(scope="session")
def subnets() -> Subnets:
    return Subnets()


# -- instances ----------------------------------------------------------------------------


def open_policy() -> Entries:
    """What an agent with no rules writes in default mode: allow-all both ways for init."""
    return compile_all({ids.INIT: ids.RESERVED_LABELS[ids.INIT]}, [], ids.RESERVED_LABELS)


@dataclass
class Instance:
    """One cellgate instance under test: its compiled datapath, kernel port and network."""

    name: str
    pin_dir: Path
    dp: Any  # datapath.kernel.loader.Datapath
    kernel: Any  # datapath.kernel.executor.KernelExecutor
    network: Network
    events: EventLog
    _hosts: Iterator[int] = field(default_factory=lambda: itertools.count(2))

    @property
    def host_device(self) -> str:
        return naming.host_device(self.name)

    def settings(self, revision: str | None = None) -> plan.Settings:
        return plan.Settings(self.name, masquerade=False, program_revision=revision or self.dp.revision)

    def gateway(self, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return next(g for g in self.network.gateways if g.version == version)

    def converge(self, desired: set[plan.KernelObject], scope: set[plan.Key]) -> plan.Plan:
        """Apply the diff for `scope`, as the agent does, and return it."""
        change = plan.diff({o for o in desired if o.key in scope}, self.kernel.observe(scope), scope)
        self.kernel.apply(change)
        return change

    def ensure_network(self) -> Instance:
        objs = plan.network_objects(self.network, self.settings())
        self.converge(objs, plan.keys(objs))
        return self

    def new_endpoint(
        self, ipv4: bool = True, ipv6: bool = True, sandbox: str | None = None, identity: int = ids.INIT
    ) -> Endpoint:
        eid = secrets.token_hex(32)
        host = next(self._hosts)
        gw4, gw6 = self.gateway(4), self.gateway(6)
        return Endpoint(
            id=eid,
            network_id=self.network.id,
            host_ifname=naming.host_ifname(eid),
            peer_ifname=naming.peer_ifname(eid),
            mac=naming.container_mac(eid),
            host_mac=naming.host_mac(eid),
            ipv4=ipaddress.IPv4Interface(f"{gw4.network[host]}/{gw4.network.prefixlen}") if ipv4 else None,
            ipv6=ipaddress.IPv6Interface(f"{gw6.network[host]}/{gw6.network.prefixlen}") if ipv6 else None,
            gateway4=gw4.ip if ipv4 else None,
            gateway6=gw6.ip if ipv6 else None,
            sandbox=sandbox if sandbox is not None else f"/var/run/netns/cgtest-{eid[:12]}",
            identity=identity,
        )

    def remove_everything(self) -> None:
        """Remove every object this instance owns: links, addresses, routes, map entries."""
        owned = self.kernel.observe()
        self.kernel.apply(plan.diff(set(), owned))


def instance_name(tag: str) -> str:
    name = f"cgk{secrets.token_hex(3)}{tag}"[:12]
    return naming.check_instance(name)


@pytest.fixture(scope="session")
def instances(subnets: Subnets) -> Iterator[Callable[[str], Instance]]:
    """Factory: the Instance for a tag, compiled on first use and torn down at session end."""
    from datapath.kernel.executor import KernelExecutor
    from datapath.kernel.loader import Datapath

    made: dict[str, Instance] = {}

    def get(tag: str) -> Instance:
        if tag in made:
            return made[tag]
        name = instance_name(tag)
        pin_dir = BPF_ROOT / name
        assert not pin_dir.exists() and not link_exists(naming.host_device(name)), f"{name} is taken"
        dp = Datapath(pin_dir)
        net4, net6 = subnets.take()
        network = Network(
            f"cgnet-{name}", (ipaddress.ip_interface(f"{net4[1]}/24"), ipaddress.ip_interface(f"{net6[1]}/64"))
        )
        inst = Instance(name, pin_dir, dp, KernelExecutor(name, dp), network, EventLog(dp))
        made[tag] = inst
        inst.kernel.policy_update(open_policy(), [])
        assert inst.kernel.policy_entries() == open_policy()
        return inst

    yield get

    for inst in made.values():
        teardown_instance(inst)


def teardown_instance(inst: Instance) -> None:
    from datapath.kernel.loader import remove_pins

    try:
        inst.remove_everything()
    finally:
        with contextlib.ExitStack() as stack:  # every step runs even if an earlier one raised
            stack.callback(remove_pins, inst.pin_dir)
            stack.callback(run, "ip", "link", "del", "dev", inst.host_device, check=False)
            stack.callback(inst.dp.close)
            stack.callback(inst.kernel.close)


@pytest.fixture(scope="session")
def dpi(instances: Callable[[str], Instance]) -> Instance:
    """The instance the datapath and layout tests share."""
    return instances("d").ensure_network()


# -- policy -------------------------------------------------------------------------------


@dataclass
class Policy:
    """The agent's policy loop in miniature, on one instance: rules and identities in,
    compile_all out, written with policy_update (additions first, removals last)."""

    inst: Instance
    repo: Repository = field(default_factory=Repository)
    identities: dict[int, LabelSet] = field(default_factory=lambda: dict(ids.RESERVED_LABELS))
    subjects: dict[int, LabelSet] = field(default_factory=lambda: {ids.INIT: ids.RESERVED_LABELS[ids.INIT]})
    _rng: random.Random = field(default_factory=lambda: random.Random(secrets.randbits(32)))

    def identity(self, app: str, subject: bool = True) -> int:
        """A fresh allocated identity for `container:app=<app>`; a subject unless told otherwise."""
        number = self._rng.randrange(ids.FIRST_ALLOCATED, ids.LAST_ALLOCATED + 1)
        while number in self.identities:
            number = self._rng.randrange(ids.FIRST_ALLOCATED, ids.LAST_ALLOCATED + 1)
        labels: LabelSet = frozenset({Label("container", "app", app)})
        self.identities[number] = labels
        if subject:
            self.subjects[number] = labels
        return number

    def add_rules(self, data: Any) -> list[Rule]:
        """Parse and add rules (ids are assigned in order, from 1); returns them with their ids."""
        new = parse_rules(data)
        self.repo.add(new)
        return self.repo.rules[-len(new) :]

    def rule_id(self, description: str) -> int:
        return next(r.id for r in self.repo.rules if r.description == description)

    def compile(self) -> Entries:
        return compile_all(self.subjects, self.repo.rules, self.identities)

    def sync(self, delete: bool = True) -> tuple[dict[PolicyKey, PolicyValue], list[PolicyKey]]:
        """Make the kernel's policy map hold the compile output; returns what was written/removed."""
        return self.write(self.compile(), delete)

    def write(self, want: Entries, delete: bool = True) -> tuple[dict[PolicyKey, PolicyValue], list[PolicyKey]]:
        have = self.inst.kernel.policy_entries()
        upserts = {k: v for k, v in want.items() if have.get(k) != v}
        deletes = [k for k in have if k not in want] if delete else []
        if upserts or deletes:
            self.inst.kernel.policy_update(upserts, deletes)
        return upserts, deletes

    @property
    def entries(self) -> Entries:
        """What the kernel holds now."""
        return self.inst.kernel.policy_entries()


@contextlib.contextmanager
def policy_session(inst: Instance) -> Iterator[Policy]:
    """A Policy on `inst`; afterwards the instance is back to the open baseline: policy map,
    tracing off, default conntrack timeouts and no ipcache entries."""
    policy = Policy(inst)
    try:
        yield policy
    finally:
        with contextlib.ExitStack() as stack:  # every step runs even if an earlier one raised
            stack.callback(policy.write, open_policy())
            stack.callback(inst.kernel.set_config, False, {})
            stack.callback(drop_ipcache, inst)


def drop_ipcache(inst: Instance) -> None:
    ipcache = {o for o in inst.kernel.observe() if isinstance(o, plan.IpcacheEntry)}
    inst.converge(set(), plan.keys(ipcache))


# -- endpoints in namespaces --------------------------------------------------------------


@dataclass
class Guest:
    """An endpoint whose container side lives in its own network namespace as eth0."""

    inst: Instance
    ep: Endpoint
    ns: str

    @property
    def ip4(self) -> ipaddress.IPv4Address:
        assert self.ep.ipv4 is not None
        return self.ep.ipv4.ip

    @property
    def ip6(self) -> ipaddress.IPv6Address:
        assert self.ep.ipv6 is not None
        return self.ep.ipv6.ip

    @property
    def ifindex(self) -> int:
        return socket.if_nametoindex(self.ep.host_ifname)

    def objects(self) -> set[plan.KernelObject]:
        return plan.endpoint_objects(self.ep, self.inst.settings())

    def set_identity(self, identity: int) -> plan.Plan:
        """Switch the endpoint (and address) entries to `identity`, as the agent does on labels."""
        self.ep = replace(self.ep, identity=identity)
        objs = self.objects()
        return self.inst.converge(objs, plan.keys(objs))


def _move_into_netns(ep: Endpoint, ns: str) -> None:
    run("ip", "netns", "add", ns)
    run("ip", "link", "set", "dev", ep.peer_ifname, "netns", ns)
    script = ["link set dev lo up", f"link set dev {ep.peer_ifname} name eth0"]
    if ep.ipv4:
        script.append(f"addr add {ep.ipv4} dev eth0")
    if ep.ipv6:
        script.append(f"addr add {ep.ipv6} dev eth0 nodad")
    script.append("link set dev eth0 up")
    if ep.gateway4:
        script.append(f"route add default via {ep.gateway4} dev eth0")
    if ep.gateway6:
        script.append(f"route add default via {ep.gateway6} dev eth0")
    run("ip", "-n", ns, "-batch", "-", stdin="\n".join(script) + "\n")


@pytest.fixture
def guests(dpi: Instance) -> Iterator[Callable[..., Guest]]:
    """Factory of endpoints (in the shared datapath instance) with their netns; all removed after the test."""
    with guest_factory(dpi) as make:
        yield make


@contextlib.contextmanager
def guest_factory(inst: Instance) -> Iterator[Callable[..., Guest]]:
    made: list[Guest] = []

    def make(
        ipv4: bool = True,
        ipv6: bool = True,
        sandbox: str | None = None,
        skip: tuple[type, ...] = (),
        identity: int = ids.INIT,
    ) -> Guest:
        inst.ensure_network()
        ep = inst.new_endpoint(ipv4, ipv6, sandbox, identity)
        guest = Guest(inst, ep, "cgns" + ep.id[:12])
        made.append(guest)
        objs = {o for o in plan.endpoint_objects(ep, inst.settings()) if not isinstance(o, skip)}
        inst.converge(objs, plan.keys(objs))
        _move_into_netns(ep, guest.ns)
        return guest

    try:
        yield make
    finally:
        errors = []
        for guest in reversed(made):
            scope = plan.keys(plan.endpoint_objects(guest.ep, inst.settings()))
            try:
                inst.converge(set(), scope)  # deleting the host veth takes eth0 in the netns with it
            except Exception as exc:  # keep tearing down the rest
                errors.append(exc)
            if link_exists(guest.ep.host_ifname):
                run("ip", "link", "del", "dev", guest.ep.host_ifname, check=False)
            run("ip", "netns", "del", guest.ns, check=False)
        if errors:
            raise errors[0]
