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
