"""The Kernel-port contract, run against datapath.fake.FakeKernel (tests/unit, no root) and the
real KernelExecutor (tests/kernel).

A module that imports the test_* functions below and defines `backends` (a pair: this
instance's Backend and another instance's, both emptied afterwards) runs the contract. If the
fake passes and the kernel fails (or the other way round), the fake has stopped being honest
and the unit tests built on it are testing fiction.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest

from datapath import naming, plan
from datapath.errors import KernelError
from datapath.fake import FakeKernel
from datapath.model import Endpoint, Network
from datapath.plan import KernelObject, Neighbour, Programs, Veth
from datapath.ports import Kernel


@dataclass
class Backend:
    """A Kernel port plus what the contract needs to know about the world around it.

    Subclasses say how the world is changed behind the port's back and what it looks like.
    """

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

    def clean(self) -> None:
        self.kernel.apply(plan.diff(set(), self.observe()))

    # -- the world behind the port ---------------------------------------------------------

    def add_foreign_link(self, name: str, peer: str, neighbour: tuple[str, str]) -> None:
        """A veth with our naming scheme but no alias tag, with a permanent neighbour and a clsact qdisc."""
        raise NotImplementedError

    def foreign_intact(self, name: str, neighbour: tuple[str, str]) -> bool:
        raise NotImplementedError

    def link_gone(self, name: str) -> bool:
        raise NotImplementedError

    def vanish(self, name: str) -> None:
        """The link disappears behind the port's back (the container's netns was destroyed)."""
        raise NotImplementedError


@dataclass
class FakeBackend(Backend):
    @property
    def fake(self) -> FakeKernel:
        assert isinstance(self.kernel, FakeKernel)
        return self.kernel

    def add_foreign_link(self, name: str, peer: str, neighbour: tuple[str, str]) -> None:
        self.foreign.append(name)
        self.fake.add_foreign_link(name)

    def foreign_intact(self, name: str, neighbour: tuple[str, str]) -> bool:
        return name in self.fake.foreign and self.link_gone(name)  # still there, and never ours

    def link_gone(self, name: str) -> bool:
        objs = self.fake.objects.values()
        return not any(name in (getattr(o, "name", None), getattr(o, "dev", None)) for o in objs)

    def vanish(self, name: str) -> None:
        self.fake.vanish(name)


def fake_backend(instance: str, octet: int) -> FakeBackend:
    net = Network(
        f"cgnet-{instance}",
        (ipaddress.ip_interface(f"10.231.{octet}.1/24"), ipaddress.ip_interface(f"fd63:67ff:{octet:x}::1/64")),
    )
    return FakeBackend(FakeKernel(), plan.Settings(instance, False, "f" * 16), net)


@pytest.fixture
def backend(backends: tuple[Backend, Backend]) -> Backend:
    return backends[0]


# -- the contract ----------------------------------------------------------------------------


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


def test_a_link_someone_else_made_is_never_taken_over(backend: Backend) -> None:
    """Creating an endpoint whose host device name is taken by a link that is not ours fails,
    and leaves that link alone."""
    ep = backend.endpoint()
    backend.converge(backend.desired())  # the network
    neighbour = (str(ep.gateway4), ep.mac)
    backend.add_foreign_link(ep.host_ifname, ep.peer_ifname, neighbour)
    desired = backend.desired(ep)

    with pytest.raises(KernelError, match=f"{ep.host_ifname} exists and is not owned"):
        backend.converge(desired, plan.keys(plan.endpoint_objects(ep, backend.settings)))

    assert backend.foreign_intact(ep.host_ifname, neighbour)
    assert backend.observe(plan.keys(plan.endpoint_objects(ep, backend.settings))) == set()


def test_endpoint_whose_link_vanished_is_removed_completely(backend: Backend) -> None:
    gone, kept = backend.endpoint(), backend.endpoint()
    backend.converge(backend.desired(gone, kept))
    backend.vanish(gone.host_ifname)
    gone_keys = plan.keys(plan.endpoint_objects(gone, backend.settings))
    # The map entries outlive the link; the address entries are still found by address (the
    # endpoint entry, keyed by the dead link's index, only by a full observe).
    assert {o.kind for o in backend.observe(gone_keys)} == {"address-entry"}
    assert {o.kind for o in backend.observe() - backend.desired(kept)} == {"endpoint-entry", "address-entry"}

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


def test_a_key_of_no_known_kind_is_refused(backend: Backend) -> None:
    with pytest.raises(KernelError, match="unknown kernel object kind"):
        backend.observe({("cgnosuchkind", "x")})
