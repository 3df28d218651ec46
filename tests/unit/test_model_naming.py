"""datapath.naming and datapath.model: derived names and the on-disk form of networks and endpoints."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from datapath import naming
from datapath.labels import Label
from datapath.model import INIT, Endpoint, Network
from tests.unit.helpers import hexid

EID = hexid("endpoint")


def test_interface_names_fit_ifnamsiz_and_never_clash() -> None:
    host, peer = naming.host_ifname(EID), naming.peer_ifname(EID)
    assert host == "cg" + EID[:13] and peer == "cgp" + EID[:12]
    assert len(host) <= naming.IFNAMSIZ and len(peer) <= naming.IFNAMSIZ
    # a peer name is never some other endpoint's host name: 'p' is not a hex digit
    assert peer[2] == "p" and all(naming.host_ifname(hexid(str(i)))[2] != "p" for i in range(50))


def test_macs_are_stable_unicast_and_locally_administered() -> None:
    for mac in (naming.host_mac(EID), naming.container_mac(EID)):
        first = int(mac[:2], 16)
        assert first & 0x01 == 0 and first & 0x02 == 0x02
        assert len(mac.split(":")) == 6
    assert naming.host_mac(EID) == naming.host_mac(EID) != naming.container_mac(EID)
    assert naming.host_mac(EID) != naming.host_mac(hexid("other"))


@pytest.mark.parametrize("name", ["cellgate", "cgt1", "a", "a-b-c", "abcdefghijkl"])
def test_good_instance_names(name: str) -> None:
    assert naming.check_instance(name) == name
    assert len(naming.host_device(name)) <= naming.IFNAMSIZ


@pytest.mark.parametrize("name", ["", "1abc", "Cellgate", "abcdefghijklm", "a_b", "a.b", "a b", "-a", "a/b"])
def test_bad_instance_names(name: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        naming.check_instance(name)


def test_endpoint_id_for_is_a_hex_id() -> None:
    eid = naming.endpoint_id_for("container", "eth0")
    assert naming.ENDPOINT_ID.match(eid)
    assert eid != naming.endpoint_id_for("containere", "th0")


def test_network_and_endpoint_documents_round_trip() -> None:
    net = Network(hexid("n"), (ipaddress.IPv4Interface("10.1.0.1/24"), ipaddress.IPv6Interface("fd00::1/64")), 5.0, "n")
    assert Network.from_doc(net.to_doc()) == net
    ep = Endpoint(
        id=EID,
        network_id=net.id,
        host_ifname=naming.host_ifname(EID),
        peer_ifname=naming.peer_ifname(EID),
        mac="02:00:00:00:00:01",
        host_mac=naming.host_mac(EID),
        ipv4=ipaddress.IPv4Interface("10.1.0.5/24"),
        gateway4=ipaddress.IPv4Address("10.1.0.1"),
        sandbox="/var/run/docker/netns/abc",
        created=7.0,
        labels=("container:app=web", "container:tier=front"),
        identity=300,
        labels_known=True,
    )
    doc = ep.to_doc()
    assert (doc["labels"], doc["identity"], doc["labels_known"]) == (
        ["container:app=web", "container:tier=front"], 300, True)
    assert Endpoint.from_doc(doc) == ep
    assert Endpoint.from_doc({**doc, "labels": ["container:tier=front", "container:app=web"]}).labels == ep.labels
    assert ep.label_set == {Label("container", "app", "web"), Label("container", "tier", "front")}
    assert ep.addresses == (ipaddress.IPv4Interface("10.1.0.5/24"),)
    assert net.gateway_for(ipaddress.ip_interface("10.1.0.9/24")) == net.gateways[0]
    assert net.gateway_for(ipaddress.ip_interface("10.2.0.9/24")) is None


def test_an_old_endpoint_document_has_no_labels_and_the_init_identity() -> None:
    doc = Endpoint(EID, "n", "h", "p", "m", "hm").to_doc()
    for key in ("labels", "identity", "labels_known"):
        del doc[key]
    ep = Endpoint.from_doc(doc)
    assert (ep.labels, ep.identity, ep.labels_known, ep.label_set) == ((), INIT, False, frozenset())


def test_sandbox_hash_is_zero_only_when_not_joined() -> None:
    ep = Endpoint(EID, "n", "h", "p", "m", "hm")
    assert ep.sandbox_hash == 0
    joined = replace(ep, sandbox="/var/run/docker/netns/abc")
    assert joined.sandbox_hash != 0
    assert joined.sandbox_hash == replace(ep, sandbox="/var/run/docker/netns/abc").sandbox_hash
