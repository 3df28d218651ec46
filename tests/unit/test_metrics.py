"""The Prometheus exposition (plugin.observe.metrics) over the agent with the fake kernel: names,
labels and values as Cilium's and Hubble's, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from datapath.fake import FakeKernel
from plugin.observe.flowlog import FlowLog
from plugin.observe.metrics import exposition
from plugin.service import Agent
from plugin.telemetry import Telemetry
from tests.unit.test_flows import NAMES, datapath_event, l7_event
from tests.unit.test_service import EP1, EP2, NET_A, make_endpoint, make_network

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(agent: Agent, flows: FlowLog, kvstore: Telemetry | None = None) -> Samples:
    body, content_type = exposition(agent, flows, lambda: kvstore)()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_agent_state_and_kernel_counters(agent: Agent, kernel: FakeKernel) -> None:
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    make_endpoint(agent, NET_A, pool, EP1, 1)
    make_endpoint(agent, NET_A, pool, EP2, 2)
    kernel.verdict_counts = {(133, 1): (5, 300), (181, 0): (2, 120), (1, 1): (10, 1000), (2, 0): (4, 400),
                             (6, 0): (9, 900)}  # 6: housekeeping frames, neither dropped nor forwarded
    m = samples(agent, FlowLog())
    assert m[("cilium_endpoint", ())] == 2
    assert m[("cilium_drop_count_total", (("direction", "INGRESS"), ("reason", "policy denied")))] == 5
    assert m[("cilium_drop_bytes_total", (("direction", "EGRESS"), ("reason", "policy denied by a deny rule")))] == 120
    assert m[("cilium_forward_count_total", (("direction", "INGRESS"),))] == 10
    assert m[("cilium_forward_count_total", (("direction", "EGRESS"),))] == 4
    assert m[("cilium_endpoint_regenerations_total", (("outcome", "success"),))] == 2
    assert m[("cilium_endpoint_regeneration_time_stats_seconds_count", (("scope", "total"),))] == 2
    assert m[("cilium_identity", (("type", "reserved"),))] >= 5
    assert m[("cilium_policy", ())] == 0 and m[("cilium_policy_max_revision", ())] == 0


def test_flow_totals_become_hubbles_counters(agent: Agent) -> None:
    flows = FlowLog(size=2, names=lambda: NAMES)
    for i in range(4):  # a denied packet: its policy verdict and its drop
        for kind in (2, 1):
            raw, ev = datapath_event(type=kind, reason=133, sport=i, side=0)
            flows.add_datapath(raw, ev)
    flows.add_l7(l7_event(status=403, verdict="denied"))
    flows.add_l7(l7_event(status=200))
    m = samples(agent, flows)
    assert m[("hubble_flows_processed_total", (("subtype", ""), ("type", "Drop"), ("verdict", "DROPPED")))] == 4
    assert m[("hubble_flows_processed_total", (("subtype", ""), ("type", "L7"), ("verdict", "FORWARDED")))] == 1
    assert m[("hubble_policy_verdicts_total", (("action", "dropped"), ("direction", "ingress"),
                                               ("match", "none")))] == 4  # more than the ring holds
    assert m[("hubble_policy_verdicts_total", (("action", "dropped"), ("direction", "ingress"),
                                               ("match", "l7/http")))] == 1
    assert m[("hubble_http_requests_total", (("method", "GET"), ("protocol", "HTTP/1.1"), ("reporter", "server"),
                                             ("status", "403")))] == 1


def test_kvstore_operations_are_a_histogram(agent: Agent) -> None:
    kv = Telemetry()
    kv.observe("kvstore_operation", 0.003, action="Get", kind="identities", outcome="success",
               scope="cellgate/state/identities/v1")
    kv.observe("kvstore_operation", 2.0, action="Get", kind="identities", outcome="success",
               scope="cellgate/state/identities/v1")
    m = samples(agent, FlowLog(), kv)
    scope = "cellgate/state/identities/v1"
    labels = (("action", "Get"), ("kind", "identities"), ("outcome", "success"), ("scope", scope))
    assert m[("cilium_kvstore_operations_duration_seconds_count", labels)] == 2
    assert m[("cilium_kvstore_operations_duration_seconds_bucket", (*labels[:2], ("le", "0.005"), *labels[2:]))] == 1
    assert m[("cilium_kvstore_operations_duration_seconds_sum", labels)] == 2.003
