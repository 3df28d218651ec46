"""Flows in Hubble's shape (datapath.flows), Hubble's filter semantics, and the flow log's ring
(plugin.observe.flowlog): records decoded from the same bytes the datapath writes."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from datapath import events
from datapath.flows import (
    FilterBuilder,
    FilterError,
    FlowFilter,
    FlowQuery,
    LabelSelector,
    Names,
    format_compact,
    format_table,
    parse_time,
    rfc3339,
    to_flow,
)
from plugin.api.messages import FlowsQuery
from plugin.observe.flowlog import FlowLog
from tests.unit.test_events_reasons import record, v4

WEB = ["container:app=web"]
DB = ["container:app=db", "container:tier=data"]


def datapath_event(t: float = 1_800_000_000.25, **fields: Any) -> tuple[bytes, dict[str, Any]]:
    """A verdict event as the agent sees it: the record and its decoded, enriched dict."""
    values = {"type": 2, "reason": 7, "dir": 1, "l4proto": 6, "src_identity": 300, "dst_identity": 301,
              "sport": 40000, "dport": 80, "saddr": v4("10.1.0.2"), "daddr": v4("10.1.0.3"), "ct_state": 0, "side": 0}
    values.update(fields)
    raw = record(**values)
    ev = events.decode(raw)
    ev["time"] = t
    ev["endpoint"] = "e" * 64
    ev["src_labels"], ev["dst_labels"] = list(WEB), list(DB)
    return raw, ev


def l7_event(t: float = 1_800_000_001.0, status: int = 200, path: str = "/public", verdict: str = "forwarded",
             method: str = "GET") -> dict[str, Any]:
    return {"type": "l7", "time": t, "l7": "http", "verdict": verdict, "side": "ingress", "rule": 0,
            "src": "10.1.0.2:40001", "dst": "10.1.0.3:80", "src_identity": 300, "dst_identity": 301,
            "src_labels": WEB, "dst_labels": DB,
            "http": {"method": method, "path": path, "host": "db", "protocol": "HTTP/1.1", "status": status}}


NAMES = Names("node-a", {("10.1.0.3", 80, 6): "cgdb"})


def test_a_verdict_event_becomes_a_hubble_flow() -> None:
    _, ev = datapath_event()
    flow = to_flow(ev, NAMES, "u-1")
    assert flow["time"] == "2027-01-15T08:00:00.250000000Z"
    assert flow["verdict"] == "FORWARDED" and flow["Type"] == "L3_L4" and flow["uuid"] == "u-1"
    assert flow["IP"] == {"source": "10.1.0.2", "destination": "10.1.0.3", "ipVersion": "IPv4"}
    assert flow["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80}}
    assert flow["source"] == {"identity": 300, "labels": WEB}
    assert flow["destination"] == {"identity": 301, "labels": DB, "pod_name": "e" * 12}  # seen at its veth
    assert flow["traffic_direction"] == "INGRESS" and flow["trace_observation_point"] == "TO_ENDPOINT"
    assert flow["event_type"] == {"type": 5} and flow["node_name"] == "node-a" and flow["is_reply"] is False
    assert flow["destination_service"] == {"name": "cgdb"}
    assert "drop_reason_desc" not in flow


@pytest.mark.parametrize(("code", "desc"), [(133, "POLICY_DENIED"), (181, "POLICY_DENY"),
                                            (132, "INVALID_SOURCE_IP"), (196, "PROXY_REQUIRED")])
def test_drops_carry_hubbles_reason_names(code: int, desc: str) -> None:
    _, ev = datapath_event(type=1, reason=code, dir=0, side=1)
    flow = to_flow(ev, NAMES)
    assert flow["verdict"] == "DROPPED" and flow["drop_reason"] == code and flow["drop_reason_desc"] == desc
    assert flow["event_type"] == {"type": 1} and flow["traffic_direction"] == "EGRESS"
    assert flow["source"]["pod_name"] == "e" * 12  # from-endpoint: the source is the local endpoint


def test_a_policy_denial_is_a_policy_verdict_and_a_drop() -> None:
    """The datapath reports a denied packet twice, as Cilium: its verdict and its drop."""
    verdict, drop = (to_flow(datapath_event(type=t, reason=133)[1], NAMES) for t in (2, 1))
    assert verdict["event_type"] == {"type": 5} and drop["event_type"] == {"type": 1}
    assert verdict["verdict"] == drop["verdict"] == "DROPPED" and drop["drop_reason_desc"] == "POLICY_DENIED"
    assert FlowFilter.parse({"event_type": ["policy-verdict"]}).matches(verdict)
    assert not FlowFilter.parse({"event_type": ["policy-verdict"]}).matches(drop)


@pytest.mark.parametrize(("code", "verdict"), [(13, "REDIRECTED"), (14, "TRANSLATED"), (15, "TRANSLATED"),
                                               (7, "FORWARDED")])
def test_proxy_and_service_verdicts(code: int, verdict: str) -> None:
    _, ev = datapath_event(reason=code)
    assert to_flow(ev, NAMES)["verdict"] == verdict


def test_an_l7_event_becomes_an_l7_flow() -> None:
    flow = to_flow(l7_event(status=403, verdict="denied"), NAMES)
    assert flow["Type"] == "L7" and flow["verdict"] == "DROPPED" and flow["event_type"] == {"type": 129}
    assert flow["l7"] == {"type": "RESPONSE", "http": {"code": 403, "method": "GET", "url": "http://db/public",
                                                       "protocol": "HTTP/1.1"}}
    assert flow["l4"] == {"TCP": {"source_port": 40001, "destination_port": 80}}
    assert flow["traffic_direction"] == "INGRESS" and flow["Summary"] == "HTTP/1.1 403 GET http://db/public"


def test_kafka_and_icmp_and_ipv6() -> None:
    kafka = to_flow({"type": "l7", "time": 1.0, "l7": "kafka", "verdict": "forwarded", "src": "[fd00::2]:5000",
                     "dst": "[fd00::3]:9092", "kafka": {"api_key_name": "produce", "api_version": 3,
                                                        "correlation_id": 7, "topics": ["orders"]}}, NAMES)
    assert kafka["l7"]["kafka"] == {"error_code": 0, "api_version": 3, "api_key": "produce", "correlation_id": 7,
                                    "topic": "orders"}
    assert kafka["IP"]["ipVersion"] == "IPv6" and kafka["IP"]["destination"] == "fd00::3"
    _, ev = datapath_event(l4proto=1, sport=8, dport=0)
    assert to_flow(ev, NAMES)["l4"] == {"ICMPv4": {"type": 8, "code": 0}}


def test_rfc3339_never_rounds_into_the_next_second() -> None:
    assert rfc3339(0.9999999999) == "1970-01-01T00:00:00.999999999Z"


# -- filters ------------------------------------------------------------------------------------


def flows_for_filters() -> dict[str, dict[str, Any]]:
    _, allowed = datapath_event()
    _, dropped = datapath_event(type=1, reason=133, saddr=v4("10.9.0.5"), src_identity=2)
    dropped["src_labels"] = ["reserved:world"]
    return {"allowed": to_flow(allowed, NAMES), "dropped": to_flow(dropped, NAMES),
            "http": to_flow(l7_event(status=503, path="/api/v1/items"), NAMES)}


def chosen(query: FlowQuery) -> set[str]:
    return {name for name, flow in flows_for_filters().items() if query.accepts(flow)}


def build(*flags: tuple[str, Any]) -> FlowQuery:
    b = FilterBuilder()
    for name, value in flags:
        if name == "not":
            b.negate_next()
        else:
            b.add(name, value)
    return b.query()


@pytest.mark.parametrize(("flags", "expected"), [
    ((), {"allowed", "dropped", "http"}),
    ((("verdict", "DROPPED"),), {"dropped"}),
    ((("verdict", "dropped"), ("verdict", "forwarded")), {"allowed", "dropped", "http"}),  # one field: ORed
    ((("from_ip", "10.9.0.0/16"),), {"dropped"}),
    ((("ip", "10.1.0.3"),), {"allowed", "dropped", "http"}),  # either side
    ((("ip", "10.9.0.5"),), {"dropped"}),
    ((("to_ip", "10.9.0.5"),), set()),
    ((("from_label", "app=web"),), {"allowed", "http"}),
    ((("label", "reserved:world"),), {"dropped"}),
    ((("to_label", "app=db,tier=data"),), {"allowed", "dropped", "http"}),
    ((("to_label", "app=db,tier!=data"),), set()),
    ((("from_label", "container:app=web"), ("to_port", "80")), {"allowed", "http"}),
    ((("from_identity", 2),), {"dropped"}),
    ((("identity", 301),), {"allowed", "dropped", "http"}),
    ((("protocol", "http"),), {"http"}),
    ((("protocol", "tcp"),), {"allowed", "dropped", "http"}),
    ((("type", "l7"),), {"http"}),
    ((("type", "drop"),), {"dropped"}),
    ((("type", "policy-verdict"),), {"allowed"}),
    ((("http_status", "5+"),), {"http"}),
    ((("http_status", "404"),), set()),
    ((("http_method", "get"),), {"http"}),
    ((("http_path", "^/api/v[0-9]+/"),), {"http"}),
    ((("to_service", "cgdb"),), {"allowed", "dropped", "http"}),
    ((("not",), ("verdict", "DROPPED")), {"allowed", "http"}),
    ((("type", "l7"), ("not",), ("http_status", "5+")), set()),
    ((("not",), ("from_label", "app=web"), ("verdict", "DROPPED")), {"dropped"}),  # --not binds the next only
    ((("not",), ("ip", "10.9.0.5")), {"allowed", "http"}),
])
def test_filters_mean_what_hubble_flags_mean(flags: tuple[tuple[Any, ...], ...], expected: set[str]) -> None:
    assert chosen(build(*[(f[0], f[1] if len(f) > 1 else None) for f in flags])) == expected


@pytest.mark.parametrize(("data", "text"), [
    ({"source_ip": ["10.0.0.300"]}, "not an address or CIDR"),
    ({"sourceIp": ["10.0.0.1"]}, "unknown flow filter field 'sourceIp'"),
    ({"verdict": ["ALLOWED"]}, "verdict: 'ALLOWED'"),
    ({"destination_port": ["0"]}, "not a port"),
    ({"http_status_code": ["6+"]}, "give a code (404) or a class (5+)"),
    ({"http_path": ["(unclosed"]}, "not a regular expression"),
    ({"source_label": ["app=web,"]}, "an empty requirement"),
    ({"source_identity": ["300"]}, "not an identity number"),
    ({"event_type": [{"type": 77}]}, "type: 77"),
    ([], "a flow filter is an object"),
])
def test_bad_filters_are_refused_by_name(data: Any, text: str) -> None:
    with pytest.raises(FilterError, match=None) as caught:
        FlowFilter.parse(data)
    assert text in str(caught.value)


def test_hubbles_json_filter_round_trips() -> None:
    f = FlowFilter.parse({"source_label": ["app=web"], "event_type": [{"type": 129}], "reply": False})
    assert f.to_json() == {"source_label": ["app=web"], "event_type": ["l7"], "reply": [False]}
    assert FlowFilter.parse(f.to_json()) == f


def test_label_selector_sources() -> None:
    assert LabelSelector.parse("app=web").matches(["container:app=web"])
    assert not LabelSelector.parse("docker:app=web").matches(["container:app=web"])
    assert LabelSelector.parse("!app").matches(["reserved:world"])
    assert LabelSelector.parse("reserved:world").matches(["reserved:world"])


def test_times() -> None:
    assert parse_time("90s", 1000.0) == 910.0 and parse_time("1h30m", 10_000.0) == 4600.0
    assert parse_time("2027-01-15T08:00:00Z", 0) == 1_800_000_000.0
    with pytest.raises(FilterError, match="give a duration"):
        parse_time("yesterday", 0)


def test_the_query_string_is_parsed_at_the_door() -> None:
    from datapath.errors import InvalidRequest

    q = FlowsQuery.parse({}, 100.0)
    assert q.last == 20 and not q.follow  # hubble's default
    q = FlowsQuery.parse({"since": "10s", "follow": "true", "allowlist": '[{"verdict": ["DROPPED"]}]'}, 100.0)
    assert (q.since, q.last, q.follow) == (90.0, 0, True) and q.query.allow[0].verdict == ("DROPPED",)
    for args, text in (({"last": "-1"}, "not a count"), ({"lst": "1"}, "unknown flow query argument"),
                       ({"first": "1", "follow": "1"}, "first cannot follow"),
                       ({"allowlist": "{"}, "Expecting"), ({"denylist": '[{"x": 1}]'}, "unknown flow filter field")):
        with pytest.raises(InvalidRequest) as caught:
            FlowsQuery.parse(args, 0.0)
        assert text in str(caught.value)


# -- the ring ----------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_and_counts_every_flow_exactly() -> None:
    log = FlowLog(size=10, names=lambda: NAMES)
    for i in range(25):
        raw, ev = datapath_event(t=1000.0 + i, type=1 if i % 5 == 0 else 2, reason=133 if i % 5 == 0 else 7, sport=i)
        log.add_datapath(raw, ev)
    log.add_l7(l7_event(t=2000.0))
    assert len(log) == 10
    kept = log.history(FlowQuery(), last=100)
    assert [r["flow"]["l4"]["TCP"]["source_port"] for r in kept[:-1]] == list(range(16, 25))
    assert kept[-1]["flow"]["Type"] == "L7"
    totals = log.totals()
    assert totals.seen == 26
    assert totals.flows == {("drop", "DROPPED"): 5, ("verdict", "FORWARDED"): 20, ("l7", "FORWARDED"): 1}
    assert totals.drops == {(133, "ingress"): 5}
    uuids = {r["flow"]["uuid"] for r in kept}
    assert len(uuids) == 10 and {r["flow"]["uuid"] for r in log.history(FlowQuery(), last=100)} == uuids  # stable


def test_history_last_first_since_until() -> None:
    log = FlowLog(size=100, names=lambda: NAMES)
    for i in range(10):
        raw, ev = datapath_event(t=1000.0 + i, sport=i)
        log.add_datapath(raw, ev)

    def ports(**kw: Any) -> list[int]:
        return [r["flow"]["l4"]["TCP"]["source_port"] for r in log.history(FlowQuery(), **kw)]

    assert ports(last=3) == [7, 8, 9]
    assert ports(first=2) == [0, 1]
    assert ports(since=1005.0) == [5, 6, 7, 8, 9]
    assert ports(since=1002.0, until=1004.0) == [2, 3, 4]
    assert ports(last=2, until=1004.0) == [3, 4]
    assert ports(first=2, since=1006.0) == [6, 7]
    drops = FlowQuery((FlowFilter.parse({"verdict": ["DROPPED"]}),))
    assert log.history(drops, last=5) == []


def test_observe_gives_history_then_new_flows_each_once() -> None:
    log = FlowLog(size=100, names=lambda: NAMES)
    for i in range(3):
        raw, ev = datapath_event(t=1000.0 + i, sport=i)
        log.add_datapath(raw, ev)
    stop = threading.Event()
    stream = log.observe(FlowQuery(), stop, last=2, heartbeat=0.05)
    got = [next(stream)["flow"]["l4"]["TCP"]["source_port"] for _ in range(2)]  # type: ignore[index]
    for i in range(3, 5):
        raw, ev = datapath_event(t=1000.0 + i, sport=i)
        log.add_datapath(raw, ev)
    while len(got) < 4:
        item = next(stream)
        if item is not None:
            got.append(item["flow"]["l4"]["TCP"]["source_port"])
    assert got == [1, 2, 3, 4]
    assert log.followers == 1
    stop.set()
    assert next(stream, "ended") in (None, "ended")
    stream.close()
    assert log.followers == 0


def test_rendering_for_people() -> None:
    log = FlowLog(size=10, names=lambda: NAMES)
    raw, ev = datapath_event(type=1, reason=133)
    log.add_datapath(raw, ev)
    log.add_l7(l7_event())
    lines = log.history(FlowQuery(), last=10)
    compact = format_compact(lines[0])
    assert "10.1.0.2:40000 (ID:300 app=web) -> 10.1.0.3:80 (ID:301 app=db,tier=data) drop INGRESS" in compact
    assert "DROPPED (POLICY_DENIED)" in compact
    assert "http-response" in format_compact(lines[1], node=True) and "[node-a]" in format_compact(lines[1], True)
    table = format_table(lines).splitlines()
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(table) == 3 and "DROPPED" in table[1]
    json.dumps(lines)  # every line is plain JSON


def test_ring_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="flow ring size 0"):
        FlowLog(size=0)
