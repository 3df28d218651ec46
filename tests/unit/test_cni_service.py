"""CNI use cases on fakes: a failed first ADD takes its network with it; CNI networks are removed on request."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

import pytest

from datapath.errors import CellgateError, Conflict, InvalidRequest, NotFound, StateError
from datapath.fake import FakeNetns
from ipam.allocator import LOCAL_SPACE, PoolRequest
from plugin.api.app import create_app as create_api
from plugin.cni.messages import AddRequest, Attachment
from plugin.monitor import EventHub
from plugin.service import Agent
from plugin.service.cni import CniService, network_id
from tests.unit.helpers import hexid, snapshot

NETNS = "/var/run/netns/cgtest"
DOCKER_NET = hexid("docker-net")


@pytest.fixture
def netns() -> FakeNetns:
    return FakeNetns()


@pytest.fixture
def cni(agent: Agent, netns: FakeNetns) -> CniService:
    return CniService(agent, netns)


def add(cni: CniService, network: str = "cgnet", container: str = "c1", **extra: Any) -> dict[str, Any]:
    """ADD of `container`'s eth0, each container in a namespace of its own."""
    netns = cni.netns
    assert isinstance(netns, FakeNetns)
    path = f"{NETNS}-{container}"
    netns.create(path)
    netns.spaces[path].clear()  # the fake keeps the inner end of a deleted veth; the kernel does not
    body = {"network": network, "container_id": container, "ifname": "eth0", "netns": path, **extra}
    return cni.add(AddRequest.parse(body))


def delete(cni: CniService, network: str = "cgnet", container: str = "c1") -> None:
    cni.delete(Attachment.parse({"network": network, "container_id": container, "ifname": "eth0"}, False))


def docker_network(agent: Agent) -> None:
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    agent.create_network(DOCKER_NET, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]


# -- a failed ADD --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"subnet": "10.5.0.0/24", "ips": ["10.6.0.9"]},  # the address is outside the configured subnet
        {"ips": ["10.6.0.9"]},  # ... outside the subnet drawn from the host range
        {"subnet": "10.5.0.0/24", "ipv6": True, "ips": ["fd00:99::9"]},
        {"subnet": "10.5.0.0/24", "ips": ["10.5.0.1"]},  # the gateway
    ],
)
def test_a_failed_first_add_removes_the_network_and_pools_it_made(
    agent: Agent, cni: CniService, netns: FakeNetns, extra: dict[str, Any]
) -> None:
    before = snapshot(agent)
    with pytest.raises(CellgateError):
        add(cni, **extra)
    assert snapshot(agent) == before and netns.spaces[f"{NETNS}-c1"] == {}
    result = add(cni, subnet="10.6.0.0/24", ips=["10.6.0.9"])  # the corrected configuration
    assert result["ips"][0]["address"] == "10.6.0.9/24"


def test_a_failed_add_keeps_a_network_that_existed(agent: Agent, cni: CniService, netns: FakeNetns) -> None:
    add(cni, subnet="10.5.0.0/24")
    before = unmoved(snapshot(agent))
    with pytest.raises(InvalidRequest, match=r"10\.6\.0\.9"):
        add(cni, container="c2", ips=["10.6.0.9"])
    netns.fail_attach = True
    with pytest.raises(CellgateError, match="injected"):
        add(cni, container="c2")
    assert unmoved(snapshot(agent)) == before


def unmoved(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """A snapshot without the pools' next-fit cursors, which a refused allocation may advance."""
    networks, endpoints, pools, objects = state
    return networks, endpoints, [dataclasses.replace(p, cursor=0) for p in pools], objects


def test_a_failed_first_add_after_the_attach_removes_the_network(
    agent: Agent, cni: CniService, netns: FakeNetns
) -> None:
    before = snapshot(agent)
    netns.fail_attach = True
    with pytest.raises(CellgateError, match="injected"):
        add(cni, ipv6=True)
    assert snapshot(agent) == before


@pytest.mark.parametrize(
    ("extra", "text"),
    [({"subnet": "127.0.0.0/24"}, "loopback"), ({"ipv6_subnet": "fe80::/64"}, "link-local"),
     ({"subnet": "224.0.0.0/24"}, "multicast")],
)
def test_special_purpose_subnets_are_refused(agent: Agent, cni: CniService, extra: dict[str, str],
                                             text: str) -> None:
    before = snapshot(agent)
    with pytest.raises(InvalidRequest, match=text) as caught:
        add(cni, **extra)
    assert getattr(caught.value, "cni_code", None) == 7
    assert snapshot(agent) == before


# -- removing CNI networks -----------------------------------------------------------------------


def test_remove_network_by_name_id_or_prefix_removes_it_and_its_pools(agent: Agent, cni: CniService) -> None:
    docker_network(agent)
    before = snapshot(agent)
    for n, ident in enumerate(("cgnet", network_id("cgnet"), network_id("cgnet")[:10])):
        add(cni, container=f"c{n}", subnet="10.5.0.0/24", ipv6=True)
        delete(cni, container=f"c{n}")
        assert agent.networks[network_id("cgnet")].origin == "cni"
        removed = cni.remove_network(ident)
        assert (removed.id, removed.name) == (network_id("cgnet"), "cgnet")
        assert snapshot(agent) == before


def test_remove_network_refuses_while_attachments_exist(agent: Agent, cni: CniService) -> None:
    add(cni)
    add(cni, container="c2")
    before = snapshot(agent)
    with pytest.raises(Conflict, match=r"CNI network 'cgnet' still has 2 attachment\(s\) \(c1/eth0, c2/eth0\)"):
        cni.remove_network("cgnet")
    assert snapshot(agent) == before


def test_remove_network_refuses_docker_networks_and_unknown_ones(agent: Agent, cni: CniService) -> None:
    docker_network(agent)
    add(cni)
    before = snapshot(agent)
    assert agent.networks[DOCKER_NET].origin == "docker"
    with pytest.raises(InvalidRequest, match="Docker network: remove it with `docker network rm`"):
        cni.remove_network(DOCKER_NET[:12])
    for unknown in ("cgnosuch", "", "0" * 65):
        with pytest.raises(NotFound, match="no network matches"):
            cni.remove_network(unknown)
    assert snapshot(agent) == before


def test_rest_delete_network(agent: Agent, cni: CniService) -> None:
    app = create_api(agent, EventHub(), lambda: {}, cni)
    client = app.test_client()
    docker_network(agent)
    add(cni, subnet="10.5.0.0/24")

    def rm(ident: str) -> tuple[int, Any]:
        resp = client.delete(f"/v1/networks/{ident}")
        return resp.status_code, json.loads(resp.data)

    status, body = rm("cgnet")
    assert status == 409 and "attachment" in body["error"]
    status, body = rm(DOCKER_NET)
    assert status == 400 and "docker network rm" in body["error"]
    delete(cni)
    status, body = rm("cgnet")
    assert status == 200 and (body["name"], body["origin"], body["subnets"]) == ("cgnet", "cni", ["10.5.0.0/24"])
    assert rm("cgnet")[0] == 404
    listed = json.loads(client.get("/v1/networks").data)
    assert [(n["id"], n["origin"]) for n in listed] == [(DOCKER_NET, "docker")]


def test_rest_cni_errors_carry_the_cni_code_of_the_one_table(agent: Agent, cni: CniService) -> None:
    client = create_api(agent, EventHub(), lambda: {}, cni).test_client()
    body = {"network": "cgnet", "container_id": "c1", "ifname": "eth0", "netns": "relative/path"}
    resp = client.post("/v1/cni/add", json=body)
    assert resp.status_code == 400 and json.loads(resp.data)["cni_code"] == 4  # explicit: INVALID_ENV
    resp = client.post("/v1/cni/check", json={**body, "netns": NETNS})
    assert resp.status_code == 404 and json.loads(resp.data)["cni_code"] == 3  # UNKNOWN_CONTAINER
    resp = client.post("/v1/cni/gc", json={"valid": []})
    assert resp.status_code == 400 and json.loads(resp.data)["cni_code"] == 7  # by class: INVALID_CONFIG
    resp = client.delete("/v1/networks/cgnosuch")  # not a CNI route: a plain problem
    assert resp.status_code == 404 and "cni_code" not in json.loads(resp.data)


# -- requests that name what they do not have ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"ips": ["10.6.0.9"]}, r"10\.6\.0\.9 is not in a subnet of network cgnet"),  # outside the subnet
        ({"ips": ["fd00:99::9"]}, r"fd00:99::9 is not in a subnet of network cgnet"),  # a family it lacks
        ({"ips": ["10.5.0.0"]}, "network address"),
        ({"ips": ["10.5.0.255"]}, "broadcast"),
        ({"ips": ["10.5.0.1"]}, "gateway"),
        ({"ips": ["10.5.0.7", "10.5.0.8"]}, "two addresses"),
    ],
)
def test_an_add_with_an_address_it_cannot_have_is_refused_before_anything_moves(
    agent: Agent, cni: CniService, extra: dict[str, Any], text: str
) -> None:
    add(cni, subnet="10.5.0.0/24", ipv6=True)
    before = snapshot(agent)  # the pools' next-fit cursors included
    with pytest.raises((InvalidRequest, Conflict), match=text):  # the gateway's is a conflict
        add(cni, container="c2", **extra)
    assert snapshot(agent) == before


def test_an_add_with_an_address_in_use_is_refused_before_anything_moves(agent: Agent, cni: CniService) -> None:
    first = add(cni, subnet="10.5.0.0/24", ipv6=True)
    before = snapshot(agent)
    with pytest.raises(Conflict, match="in use"):
        add(cni, container="c2", ips=[first["ips"][1]["address"].split("/")[0]])  # IPv6: IPv4's goes first
    assert snapshot(agent) == before


def test_del_and_check_under_another_networks_name_leave_the_attachment_alone(
    agent: Agent, cni: CniService, netns: FakeNetns
) -> None:
    add(cni, network="cgnet", subnet="10.5.0.0/24")
    add(cni, network="cgother", container="c2", subnet="10.7.0.0/24")
    before = snapshot(agent)
    other = Attachment.parse({"network": "cgother", "container_id": "c1", "ifname": "eth0",
                              "netns": f"{NETNS}-c1"}, False)
    assert cni.delete(other) is False  # CNI: a DEL of what is not there succeeds and does nothing
    assert snapshot(agent) == before
    with pytest.raises(NotFound, match="c1/eth0 is attached to network cgnet, not cgother") as caught:
        cni.check(other)
    assert caught.value.cni_code == 3  # UNKNOWN_CONTAINER
    assert cni.delete(dataclasses.replace(other, network="cgnet")) is True


def test_del_of_a_gone_attachment_under_another_name_keeps_what_its_own_network_reserved(
    agent: Agent, cni: CniService
) -> None:
    add(cni, network="cgnet", subnet="10.5.0.0/24")
    eid = Attachment.parse({"network": "cgnet", "container_id": "c1", "ifname": "eth0"}, False).endpoint_id
    agent.delete_endpoint(network_id("cgnet"), eid, origin="cni")  # the endpoint went, its reservation did not
    before = snapshot(agent)
    delete(cni, network="cgother")
    assert snapshot(agent) == before
    delete(cni, network="cgnet")
    assert not list(agent.ipam.pool(f"{LOCAL_SPACE}/10.5.0.0/24").endpoint_allocations())


def test_a_rollback_that_cannot_remove_its_endpoint_keeps_the_endpoints_addresses(
    agent: Agent, cni: CniService, netns: FakeNetns, stores: Any
) -> None:
    """ADD fails after its endpoint exists, and the state dir refuses the endpoint's removal: the
    endpoint stays, and so do its addresses (freed, the next ADD would be handed the same one)."""
    add(cni, subnet="10.5.0.0/24")
    netns.fail_attach = True
    stores.endpoints.fail_next_delete = StateError("read-only file system")
    with pytest.raises(CellgateError, match="injected attach failure"):
        add(cni, container="c2")
    netns.fail_attach = False
    eid = Attachment.parse({"network": "cgnet", "container_id": "c2", "ifname": "eth0"}, False).endpoint_id
    stuck = agent.endpoints[eid]
    assert stuck.ipv4 is not None
    found = agent.ipam.lookup(stuck.ipv4.ip)
    assert found is not None and found[1].owner == eid
    third = add(cni, container="c3")
    assert third["ips"][0]["address"] != str(stuck.ipv4)
