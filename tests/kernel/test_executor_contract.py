"""One Kernel-port contract, run against datapath.fake.FakeKernel and the real KernelExecutor.

If the fake passes and the kernel fails (or the other way round), the fake has stopped
being honest and the unit tests built on it are testing fiction.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest

from datapath import naming, plan
from datapath.errors import KernelError
from datapath.fake import FakeKernel
from datapath.model import Endpoint, Network
from datapath.plan import KernelObject, Neighbour, Programs, Veth
from datapath.ports import Kernel

from .conftest import Instance
from .helpers import link_exists, run

pytestmark = pytest.mark.kernel


@dataclass
class Backend:
    """A Kernel port plus what the contract needs to know about the world around it."""

    kind: str
    kernel: Kernel
    settings: plan.Settings
    network: Network
    foreign: list[str] = field(default_factory=list)  # links made behind the port's back
    _hosts: Iterator[int] = field(default_factory=lambda: itertools.count(2))

    def endpoint(self, ipv6: bool = True) -> Endpoint:
        eid = secrets.token_hex(32)
        gw4, gw6 = self.network.gateways
        host = next(self._hosts)
        return Endpoint(
            eid,
            self.network.id,
            naming.host_ifname(eid),
            naming.peer_ifname(eid),
            naming.container_mac(eid),
            naming.host_mac(eid),
            ipv4=ipaddress.IPv4Interface(f"{gw4.network[host]}/24"),
            ipv6=ipaddress.IPv6Interface(f"{gw6.network[host]}/64") if ipv6 else None,
            gateway4=ipaddress.IPv4Address(gw4.ip),
            gateway6=ipaddress.IPv6Address(gw6.ip) if ipv6 else None,
            sandbox=f"/var/run/netns/cgtest-{eid[:12]}",
        )

    def desired(self, *endpoints: Endpoint) -> set[KernelObject]:
        return plan.desired_state([self.network], endpoints, self.settings)

    def converge(self, desired: set[KernelObject], scope: set[plan.Key] | None = None) -> plan.Plan:
        change = plan.diff(desired, self.kernel.observe(scope), scope)
        self.kernel.apply(change)
        return change

    def observe(self, scope: set[plan.Key] | None = None) -> set[KernelObject]:
        return self.kernel.observe(scope)

    def add_foreign_link(self, name: str, peer: str, neighbour: tuple[str, str]) -> None:
        """A veth with our naming scheme but no alias tag, with a permanent neighbour and a clsact qdisc."""
        self.foreign.append(name)
        if self.kind == "fake":
            return  # the fake holds only what it was given: nothing outside it can exist
        run("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", "dev", name, "up")
        run("ip", "neigh", "replace", neighbour[0], "lladdr", neighbour[1], "dev", name, "nud", "permanent")
        run("tc", "qdisc", "add", "dev", name, "clsact")

    def foreign_intact(self, name: str, neighbour: tuple[str, str]) -> bool:
        if self.kind == "fake":
            return name in self.foreign
        neigh = run("ip", "neigh", "show", "dev", name).stdout
        qdisc = run("tc", "qdisc", "show", "dev", name).stdout
        return link_exists(name) and neighbour[0] in neigh and "PERMANENT" in neigh and "clsact" in qdisc

    def link_gone(self, name: str) -> bool:
        return self.kind == "fake" or not link_exists(name)


def _fake_backend(instance: str, octet: int) -> Backend:
    net = Network(
        f"cgnet-{instance}",
        (ipaddress.ip_interface(f"10.231.{octet}.1/24"), ipaddress.ip_interface(f"fd63:67ff:{octet:x}::1/64")),
    )
    return Backend("fake", FakeKernel(), plan.Settings(instance, False, "f" * 16), net)


def _kernel_backend(inst: Instance) -> Backend:
    return Backend("kernel", inst.kernel, inst.settings(), inst.network)


@pytest.fixture(scope="module")
def contract_instances(instances: Callable[[str], Instance]) -> tuple[Instance, Instance]:
    return instances("c"), instances("o")


def _clean(backend: Backend) -> None:
    if backend.kind == "kernel":
        backend.kernel.apply(plan.diff(set(), backend.observe()))
        for name in backend.foreign:
            if link_exists(name):
                run("ip", "link", "del", "dev", name)


@pytest.fixture(params=["fake", "kernel"])
def backends(request: pytest.FixtureRequest) -> Iterator[tuple[Backend, Backend]]:
    """This instance's port and another instance's port, of the same kind; both emptied afterwards."""
    if request.param == "fake":
        pair = (_fake_backend("cgkfake1", 250), _fake_backend("cgkfake2", 251))
    else:
        mine, other = request.getfixturevalue("contract_instances")
        pair = (_kernel_backend(mine), _kernel_backend(other))
    try:
        yield pair
    finally:
        for backend in pair:
            _clean(backend)


@pytest.fixture
def backend(backends: tuple[Backend, Backend]) -> Backend:
    return backends[0]


def test_apply_then_observe_equals_desired_and_rediff_is_empty(backend: Backend) -> None:
    desired = backend.desired(backend.endpoint(), backend.endpoint(ipv6=False))
    scope = plan.keys(desired)

    first = backend.converge(desired, scope)

    assert first.add and not first.remove and not first.change
    assert backend.observe(scope) == desired
    assert backend.observe() == desired
    assert not plan.diff(desired, backend.observe(scope), scope)
    assert not backend.converge(desired, scope)  # applying again is a no-op


def test_removing_an_endpoint_leaves_none_of_its_keys(backend: Backend) -> None:
    gone, kept = backend.endpoint(), backend.endpoint()
    backend.converge(backend.desired(gone, kept))
    gone_keys = plan.keys(plan.endpoint_objects(gone, backend.settings))
    remaining = backend.desired(kept)

    change = backend.converge(remaining, gone_keys)

    assert {o.key for o in change.remove} == gone_keys and not change.add
    assert backend.observe(gone_keys) == set()
    assert backend.observe() == remaining
    assert backend.link_gone(gone.host_ifname) and backend.link_gone(gone.peer_ifname)


def test_observe_everything_returns_only_this_instances_objects(backends: tuple[Backend, Backend]) -> None:
    mine, other = backends
    if mine.kind == "kernel":
        assert mine.settings.instance != other.settings.instance
    my_state = mine.desired(mine.endpoint(), mine.endpoint(ipv6=False))
    their_state = other.desired(other.endpoint())
    mine.converge(my_state)
    other.converge(their_state)

    assert mine.observe() == my_state
    assert other.observe() == their_state
    assert mine.observe(plan.keys(their_state)) == set()

    # Asked outright to remove the other instance's objects, a port leaves them alone ...
    mine.kernel.apply(plan.diff(set(), their_state))
    assert other.observe() == their_state
    mine.converge(set())  # ... and a full cleanup of one instance leaves the other alone too

    assert mine.observe() == set()
    assert other.observe() == their_state


def test_link_with_our_naming_but_no_tag_is_never_observed_or_removed(backend: Backend) -> None:
    ep = backend.endpoint()
    backend.converge(backend.desired(ep))
    eid = secrets.token_hex(32)
    name, mac = naming.host_ifname(eid), naming.host_mac(eid)
    neighbour = (str(ep.gateway4), naming.container_mac(eid))
    backend.add_foreign_link(name, naming.peer_ifname(eid), neighbour)
    foreign_keys = {("veth", name), ("programs", name), ("endpoint-entry", name), ("neighbour", name, neighbour[0])}

    assert backend.observe(foreign_keys) == set()
    assert not any(name in (getattr(o, "name", None), getattr(o, "dev", None)) for o in backend.observe())

    tag = naming.link_tag(backend.settings.instance) + eid
    backend.kernel.apply(
        plan.Plan(
            remove=(
                Neighbour(name, ipaddress.ip_address(neighbour[0]), neighbour[1]),
                Programs(name, backend.settings.program_revision),
                Veth(name, mac, tag),
            )
        )
    )
    backend.converge(set())  # and a full cleanup of the instance

    assert backend.foreign_intact(name, neighbour)
    assert backend.observe() == set()


def test_endpoint_whose_link_vanished_is_removed_completely(backend: Backend) -> None:
    gone, kept = backend.endpoint(), backend.endpoint()
    backend.converge(backend.desired(gone, kept))
    if isinstance(backend.kernel, FakeKernel):
        backend.kernel.vanish(gone.host_ifname)
    else:
        run("ip", "link", "del", "dev", gone.host_ifname)  # the container's netns was destroyed
    gone_keys = plan.keys(plan.endpoint_objects(gone, backend.settings))

    backend.converge(backend.desired(kept), gone_keys)  # what the agent's sweep does

    assert backend.observe() == backend.desired(kept)


def _interrupted_create(backend: Backend, ep: Endpoint, monkeypatch: pytest.MonkeyPatch) -> Veth:
    """Converge `ep` with the agent dying (here: failing) right after the kernel made its veth."""
    desired = backend.desired(ep)
    backend.foreign.append(ep.host_ifname)  # removed by name at the end, whatever happens
    monkeypatch.setenv("CELLGATE_FAILPOINTS", "kernel.veth.created=error")
    with pytest.raises(KernelError, match="failpoint"):
        backend.converge(desired, plan.keys(desired))
    monkeypatch.delenv("CELLGATE_FAILPOINTS")
    return next(o for o in desired if isinstance(o, Veth))


def test_a_veth_is_ours_from_the_request_that_creates_it(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """No instant exists at which our veth is in the kernel without our mark: one interrupted
    before it was tagged is observed as ours (with no tag yet), and a retried create completes it."""
    ep = backend.endpoint()
    veth = _interrupted_create(backend, ep, monkeypatch)

    assert backend.observe({veth.key}) == {replace(veth, tag="")}
    assert replace(veth, tag="") in backend.observe()

    desired = backend.desired(ep)
    change = backend.converge(desired, plan.keys(desired))  # the retried create
    assert [(old.key, new) for old, new in change.change] == [(veth.key, veth)]  # completed in place
    assert backend.observe() == desired
    assert not backend.converge(desired, plan.keys(desired))


def test_cleanup_removes_an_interrupted_veth_and_only_this_instances(
    backends: tuple[Backend, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = backends
    ep, theirs = mine.endpoint(), other.endpoint()
    _interrupted_create(mine, ep, monkeypatch)
    their_veth = _interrupted_create(other, theirs, monkeypatch)

    assert other.observe({their_veth.key}) == {replace(their_veth, tag="")}
    assert mine.observe({their_veth.key}) == set()

    mine.converge(set())  # what `cellgate cleanup` does
    assert mine.observe() == set()
    assert mine.link_gone(ep.host_ifname) and mine.link_gone(ep.peer_ifname)
    assert other.observe({their_veth.key}) == {replace(their_veth, tag="")}  # the other instance's stays
    other.converge(set())
    assert other.observe() == set() and other.link_gone(theirs.host_ifname)


def test_create_replaces_an_untagged_veth_only_with_this_endpoints_name_and_mac(
    contract_instances: tuple[Instance, Instance],
) -> None:
    """An older agent killed between creating and tagging left an untagged veth with the endpoint's
    derived name and MAC (a hash of the whole endpoint ID, which only cellgate computes): a retried
    create of that endpoint replaces it. Our name with any other MAC is someone else's: refused, intact."""
    backend = _kernel_backend(contract_instances[0])
    try:
        ep, stranger = backend.endpoint(), backend.endpoint()
        backend.converge(backend.desired())  # the network
        for e, mac in ((ep, ep.host_mac), (stranger, "02:00:5e:10:00:01")):
            backend.foreign.append(e.host_ifname)
            run("ip", "link", "add", e.host_ifname, "address", mac, "type", "veth", "peer", "name", e.peer_ifname)

        desired = backend.desired(ep)
        backend.converge(desired, plan.keys(desired))
        assert backend.observe() == desired
        shown = run("ip", "-d", "link", "show", "dev", ep.host_ifname).stdout
        assert f"alias {naming.link_tag(backend.settings.instance) + ep.id}" in shown
        assert f" group {naming.link_group(backend.settings.instance)} " in shown  # set by the creating request
        peer = run("ip", "-d", "link", "show", "dev", ep.peer_ifname).stdout
        assert " group default " in peer and "alias" not in peer  # the peer is never observed as ours

        refused = backend.desired(stranger)
        with pytest.raises(KernelError, match=f"{stranger.host_ifname} exists and is not owned"):
            backend.converge(refused, plan.keys(plan.endpoint_objects(stranger, backend.settings)))
        assert "02:00:5e:10:00:01" in run("ip", "link", "show", "dev", stranger.host_ifname).stdout
        assert backend.observe(plan.keys(refused) - plan.keys(desired)) == set()
    finally:
        _clean(backend)
