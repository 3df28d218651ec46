"""The L7 redirect in the real programs: a flow whose policy entry carries an L7 filter is handed
to a transparent listener with bpf_sk_assign (original destination as its own address, the flow
marked `proxy` in conntrack with the filter), and fails closed with a named drop reason when no
listener is there; L3/L4 still decides first."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from datapath import naming, plan
from datapath.kernel.proxymap import ConntrackReader, mark_for
from datapath.policy.compile import Entries

from .conftest import Guest, Instance, Policy, guest_factory, policy_session
from .helpers import VERDICT, tcp_try

Endpoints = Callable[..., Guest]
L7 = 7  # the filter number the entries carry here (the agent numbers them; the kernel only passes it on)


@pytest.fixture(scope="module")
def xi(instances: Callable[[str], Instance]) -> Instance:
    return instances("x").ensure_network()


@pytest.fixture
def policy(xi: Instance) -> Iterator[Policy]:
    with policy_session(xi) as session:
        yield session
    xi.kernel.config.set_proxy_port(0)


@pytest.fixture
def endpoints(xi: Instance, policy: Policy) -> Iterator[Endpoints]:
    with guest_factory(xi) as make:
        yield make


def http_rule(subject: str, peer: str) -> dict[str, Any]:
    return {"description": f"{subject}-l7", "endpointSelector": {"matchLabels": {"app": subject}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                      "rules": {"http": [{"method": "GET"}]}}]}]}


def numbered(entries: Entries) -> Entries:
    return {k: dataclasses.replace(v, l7=L7) if v.filter is not None else v for k, v in entries.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_a_listener_l7_flows_drop_with_a_named_reason(xi: Instance, policy: Policy,
                                                              endpoints: Endpoints) -> None:
    a_id, b_id, c_id = policy.identity("a"), policy.identity("b"), policy.identity("c")
    policy.add_rules([http_rule("b", "a")])
    policy.write(numbered(policy.compile()))
    assert any(v.l7 == L7 for v in policy.entries.values())  # the number went through the kernel map
    xi.kernel.config.set_proxy_port(free_port())  # nothing listens there
    a, b, c = endpoints(identity=a_id), endpoints(identity=b_id), endpoints(identity=c_id)
    since = xi.events.mark()
    assert tcp_try(a.ns, b.ip4, 80, 0.5) == "timeout"
    assert tcp_try(c.ns, b.ip4, 80, 0.5) == "timeout"
    drop = xi.events.wait_for(lambda e: e["type"] == "drop" and e.get("src_identity") == a_id, since=since,
                              what="the L7 flow's drop")
    assert drop["code"] == VERDICT["DROP_PROXY_LOOKUP"] and drop["dst_identity"] == b_id
    other = xi.events.wait_for(lambda e: e["type"] == "drop" and e.get("src_identity") == c_id, since=since,
                               what="the L4 drop")
    assert other["code"] == VERDICT["DROP_POLICY"]  # L3/L4 decides before the proxy matters


@pytest.mark.parametrize("family", [4, 6])
def test_a_transparent_listener_gets_the_flow_with_its_original_destination(
        xi: Instance, policy: Policy, endpoints: Endpoints, family: int) -> None:
    a_id, b_id = policy.identity("a"), policy.identity("b")
    policy.add_rules([http_rule("b", "a")])
    policy.write(numbered(policy.compile()))
    port = free_port()
    route = plan.ProxyRoute(family, naming.proxy_table(xi.name))
    xi.kernel.apply(plan.Plan(add=(route,)))
    listener = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
    try:
        if family == 4:
            listener.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            listener.bind(("127.0.0.1", port))
        else:
            listener.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(("::1", port))
        listener.listen(8)
        xi.kernel.config.set_proxy_port(port)
        a, b = endpoints(identity=a_id), endpoints(identity=b_id)
        dst, src = (b.ip4, a.ip4) if family == 4 else (b.ip6, a.ip6)
        seen: dict[str, Any] = {}

        def accept() -> None:
            listener.settimeout(5)
            conn, peer = listener.accept()
            with conn:
                seen["peer"], seen["local"] = peer[:2], conn.getsockname()[:2]
                flow = ConntrackReader(xi.pin_dir).lookup(peer, conn.getsockname())
                seen["flow"] = flow
                seen["request"] = conn.recv(64)
                conn.sendall(b"cg 80\necho hello\n")  # what tcp_try expects of a server on 80

        t = threading.Thread(target=accept)
        t.start()
        out = tcp_try(a.ns, dst, 80, 3.0)
        t.join()
        assert out == "ok", out
        assert seen["local"] == (str(dst), 80) and seen["peer"][0] == str(src)
        assert seen["request"] == b"hello\n"
        flow = seen["flow"]
        assert flow is not None and (flow.src_identity, flow.dst_identity) == (a_id, b_id)
        assert (flow.l7_egress, flow.l7_ingress) == (0, L7)
        assert mark_for(a_id) & 0xF00 == 0xA00 and mark_for(a_id) != 0xA00
    finally:
        listener.close()
        xi.kernel.apply(plan.Plan(remove=(route,)))
