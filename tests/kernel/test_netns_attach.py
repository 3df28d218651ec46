"""Where a CNI endpoint's container end is born, and NetnsOps.attach finishing it either way.

The executor creates the container end inside the namespace the endpoint names, under its
final name (no cross-namespace move later); when that namespace cannot be used, the end
waits in the host namespace and attach moves it in, as before.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from datapath import plan
from datapath.kernel.netns import NetnsOps
from datapath.model import Endpoint

from .conftest import Instance
from .helpers import in_ns, link_exists, ping, run

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def inst(instances: Callable[[str], Instance]) -> Instance:
    return instances("n").ensure_network()


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def new() -> str:
        name = f"cgkns{secrets.token_hex(4)}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield new
    for name in made:
        run("ip", "netns", "del", name, check=False)


def _cni_endpoint(inst: Instance, path: str, ifname: str) -> Endpoint:
    return replace(inst.new_endpoint(ipv6=False, sandbox=path), origin="cni", ifname=ifname)


def _add(inst: Instance, ep: Endpoint) -> None:
    objs = plan.endpoint_objects(ep, inst.settings())
    inst.converge(objs, plan.keys(objs))


def _remove(inst: Instance, ep: Endpoint) -> None:
    inst.converge(set(), plan.keys(plan.endpoint_objects(ep, inst.settings())))


def _configure(ep: Endpoint, path: str) -> list[object]:
    assert ep.ipv4 is not None and ep.gateway4 is not None
    return NetnsOps().attach(path, ep.peer_ifname, ep.ifname, [ep.ipv4], [ep.gateway4])


def test_the_container_end_is_born_in_its_namespace_under_its_final_name(
    inst: Instance, netns: Callable[[], str]
) -> None:
    ns = netns()
    ep = _cni_endpoint(inst, f"/run/netns/{ns}", "net7")
    _add(inst, ep)
    try:
        assert not link_exists(ep.peer_ifname), "no end waits in the host namespace"
        inside = in_ns(ns, "ip", "-o", "link", "show", "net7").stdout
        assert ep.mac in inside.lower()
        assert _configure(ep, f"/run/netns/{ns}") == [ep.gateway4]
        assert f"{ep.ipv4}" in in_ns(ns, "ip", "-o", "-4", "addr", "show", "net7").stdout
        assert "default via" in in_ns(ns, "ip", "-4", "route").stdout
        assert ep.gateway4 is not None
        ping(ns, ep.gateway4)  # answered by the datapath (ARP) and the host: the pair works
    finally:
        _remove(inst, ep)
    assert "net7" not in in_ns(ns, "ip", "-o", "link").stdout, "deleting the host end removes the inner one"


def test_an_end_left_in_the_host_namespace_is_moved_in_by_attach(inst: Instance, netns: Callable[[], str]) -> None:
    missing = f"/run/netns/cgkgone{secrets.token_hex(4)}"
    ep = _cni_endpoint(inst, missing, "net8")
    _add(inst, ep)  # the namespace does not exist (yet): the end is made in the host namespace
    try:
        assert link_exists(ep.peer_ifname)
        ns = netns()
        moved = replace(ep, sandbox=f"/run/netns/{ns}")
        assert _configure(moved, f"/run/netns/{ns}") == [ep.gateway4]
        assert not link_exists(ep.peer_ifname)
        assert f"{ep.ipv4}" in in_ns(ns, "ip", "-o", "-4", "addr", "show", "net8").stdout
    finally:
        _remove(inst, ep)


def test_attach_without_either_end_is_a_clear_error(inst: Instance, netns: Callable[[], str]) -> None:
    from datapath.errors import KernelError

    ns = netns()
    ep = _cni_endpoint(inst, f"/run/netns/{ns}", "net9")
    with pytest.raises(KernelError, match="missing"):
        _configure(ep, f"/run/netns/{ns}")
