"""Services in the kvstore: what a node publishes reads back equal, and what it did not write
(foreign, malformed, out of range) is refused as BadData naming the problem."""

from __future__ import annotations

import json

import pytest

from datapath.services import parse_request
from plugin.service import cluster_keys as keys


def spec(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {"name": "web", "frontend": "10.96.1.10:80/tcp", "backends": [], "selector": "app=web",
                              "target_port": 80, "node": "n1", "id": 0}
    doc.update(extra)
    return doc


def test_a_published_service_reads_back_equal() -> None:
    from dataclasses import replace

    for body in ({"frontend": "10.96.1.10:80", "selector": "app=web", "target_port": 80, "name": "web"},
                 {"frontend": "[fd96::1]:53/udp", "backends": ["[fd00::5]:53", "[fd00::6]:5353"]}):
        s = replace(parse_request(body), node="n1")
        key = keys.service_key(s.name)
        assert key.startswith(keys.SERVICES)
        assert keys.parse_service(key, keys.encode_service(s)) == s


@pytest.mark.parametrize(("doc", "message"), [
    (spec(name="other"), "holds service 'other'"),
    (spec(frontend="10.96.1.10:0"), "port 0"),
    (spec(frontend="127.0.0.1:80"), "is a loopback address"),
    (spec(selector="app in (a)"), "not supported"),
    (spec(selector="", target_port=0, backends=[f"10.1.{i // 256}.{i % 256}:80" for i in range(5000)]), "at most"),
    (spec(extra=1), "unknown field 'extra'"),
    (spec(node="../x"), "bad owner node"),
    (spec(node=""), "bad owner node"),
    (spec(id=True), "bad id"),
])
def test_foreign_or_malformed_services_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(keys.BadData, match=message.replace("(", r"\(").replace(")", r"\)")):
        keys.parse_service(keys.service_key("web"), json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b"\xff", b"x" * (keys.MAX_SERVICE_VALUE + 1)])
def test_values_that_are_no_service_document(raw: bytes) -> None:
    with pytest.raises(keys.BadData):
        keys.parse_service(keys.service_key("web"), raw)


def test_keys_outside_the_prefix_are_refused() -> None:
    with pytest.raises(keys.BadData, match="not under"):
        keys.parse_service("cellgate/state/nodes/v1/default/web", json.dumps(spec()).encode())


# -- nodes and identities ------------------------------------------------------------------------


def node(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {"Name": "n1", "Cluster": "default", "uid": "u1", "tunnel": "vxlan",
                              "IPAddresses": [{"Type": "InternalIP", "IP": "192.0.2.1"}],
                              "IPv4AllocCIDR": "10.10.0.0/16", "IPv6AllocCIDR": "fd00:10::/64"}
    doc.update(extra)
    return doc


def test_a_node_record_reads_back_its_ranges() -> None:
    record = keys.parse_node(keys.node_key("n1"), json.dumps(node()).encode())
    assert str(record.node.ipv4_range) == "10.10.0.0/16" and str(record.node.ipv6_range) == "fd00:10::/64"
    assert keys.parse_node(keys.node_key("n1"), record.encode()) == record
    empty = keys.parse_node(keys.node_key("n1"), json.dumps(node(IPv4AllocCIDR="", IPv6AllocCIDR=None)).encode())
    assert empty.node.ranges == ()


@pytest.mark.parametrize(("doc", "message"), [
    (node(IPv4AllocCIDR=5), "IPv4AllocCIDR"),  # was taken as 0.0.0.5/32
    (node(IPv4AllocCIDR=167772160), "IPv4AllocCIDR"),
    (node(IPv4AllocCIDR=["10.10.0.0/16"]), "IPv4AllocCIDR"),
    (node(IPv4AllocCIDR=True), "IPv4AllocCIDR"),
    (node(IPv4AllocCIDR="10.10.0.5"), "IPv4AllocCIDR"),  # an address, not a range
    (node(IPv4AllocCIDR="10.10.0.5/16"), "IPv4AllocCIDR"),  # host bits set
    (node(IPv4AllocCIDR="fd00:10::/64"), "IPv4AllocCIDR"),
    (node(IPv6AllocCIDR=5), "IPv6AllocCIDR"),
    (node(IPv6AllocCIDR={"x": 1}), "IPv6AllocCIDR"),
    (node(IPAddresses=[{"IP": 3221225985}]), "IP"),  # 192.0.2.1 as a number
    (node(uid=5), "uid"),
    (node(tunnel=["vxlan"]), "tunnel"),
])
def test_node_records_with_values_of_the_wrong_type_or_form_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(keys.BadData, match=message):
        keys.parse_node(keys.node_key("n1"), json.dumps(doc).encode())

