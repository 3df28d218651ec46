"""The Kernel-port contract (tests/contract/kernel_port.py) against the real KernelExecutor,
and against datapath.fake.FakeKernel side by side (tests/unit runs the fake half without root).

Plus what only the kernel can show: links left by an older agent, groups, aliases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from datapath import naming, plan
from datapath.errors import KernelError
from tests.contract.kernel_port import *  # noqa: F403 - the contract's tests and `backend`
from tests.contract.kernel_port import Backend, fake_backend

from .conftest import Instance
from .helpers import link_exists, run

pytestmark = pytest.mark.kernel


@dataclass
class KernelBackend(Backend):
    def add_foreign_link(self, name: str, peer: str, neighbour: tuple[str, str]) -> None:
        self.foreign.append(name)
        run("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", "dev", name, "up")
        run("ip", "neigh", "replace", neighbour[0], "lladdr", neighbour[1], "dev", name, "nud", "permanent")
        run("tc", "qdisc", "add", "dev", name, "clsact")

    def foreign_intact(self, name: str, neighbour: tuple[str, str]) -> bool:
        neigh = run("ip", "neigh", "show", "dev", name).stdout
        qdisc = run("tc", "qdisc", "show", "dev", name).stdout
        return link_exists(name) and neighbour[0] in neigh and "PERMANENT" in neigh and "clsact" in qdisc

    def link_gone(self, name: str) -> bool:
        return not link_exists(name)

    def vanish(self, name: str) -> None:
        run("ip", "link", "del", "dev", name)

    def clean(self) -> None:
        super().clean()
        for name in self.foreign:
            if link_exists(name):
                run("ip", "link", "del", "dev", name)


def _kernel_backend(inst: Instance) -> KernelBackend:
    return KernelBackend(inst.kernel, inst.settings(), inst.network)


@pytest.fixture(scope="module")
def contract_instances(instances: Callable[[str], Instance]) -> tuple[Instance, Instance]:
    return instances("c"), instances("o")


@pytest.fixture(params=["fake", "kernel"])
def backends(request: pytest.FixtureRequest) -> Iterator[tuple[Backend, Backend]]:
    """This instance's port and another instance's port, of the same kind; both emptied afterwards."""
    pair: tuple[Backend, Backend]
    if request.param == "fake":
        pair = (fake_backend("cgkfake1", 250), fake_backend("cgkfake2", 251))
    else:
        mine, other = request.getfixturevalue("contract_instances")
        pair = (_kernel_backend(mine), _kernel_backend(other))
    try:
        yield pair
    finally:
        for backend in pair:
            backend.clean()


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
        backend.clean()
