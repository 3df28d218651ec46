"""Prometheus exposition at /metrics, with Cilium's and Hubble's names. Everything is read at
scrape time: the kernel's per-CPU verdict counters (cg_metrics, by code and direction), the map
fill levels, the agent's state and telemetry, and the flow log's exact totals. Nothing is counted
twice or sampled; a scrape costs the agent's lock a few times and one walk of the hash maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from datapath import reasons
from plugin.observe.flowlog import FlowLog

if TYPE_CHECKING:
    from plugin.service import Agent
    from plugin.telemetry import Telemetry

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
DIRECTION = {0: "EGRESS", 1: "INGRESS"}  # cg_metrics' direction bit: from the endpoint, towards it
HUBBLE_TYPES = {"drop": "Drop", "trace": "Trace", "verdict": "PolicyVerdict", "l7": "L7"}
# consumed on purpose, and events the ring had no room for: neither dropped nor forwarded packets
NOT_FORWARDED = {c for c, (name, _) in reasons.VERDICTS.items() if name in ("CG_OK_QUIET", "CG_OK_EVENT_LOST")}
EVENT_LOST = next(c for c, (name, _) in reasons.VERDICTS.items() if name == "CG_OK_EVENT_LOST")


class AgentCollector:
    """One scrape: every metric family, from the sources' current state."""

    def __init__(self, agent: Agent, flows: FlowLog, kvstore: Callable[[], Telemetry | None] = lambda: None) -> None:
        self.agent = agent
        self.flows = flows
        self.kvstore = kvstore

    def collect(self) -> Iterator[Metric]:
        counters = self.agent.directed_counters()  # one read of the per-CPU map per scrape
        yield from self._datapath(counters)
        yield from self._agent()
        yield from self._hubble(counters)

    def _datapath(self, counters: dict[tuple[int, int], tuple[int, int]]) -> Iterator[Metric]:
        drops = CounterMetricFamily("cilium_drop_count", "Packets dropped by the datapath",
                                    labels=["reason", "direction"])
        drop_bytes = CounterMetricFamily("cilium_drop_bytes", "Bytes dropped by the datapath",
                                         labels=["reason", "direction"])
        forwards = CounterMetricFamily("cilium_forward_count", "Packets forwarded by the datapath",
                                       labels=["direction"])
        forward_bytes = CounterMetricFamily("cilium_forward_bytes", "Bytes forwarded by the datapath",
                                            labels=["direction"])
        forwarded: dict[str, list[int]] = {d: [0, 0] for d in DIRECTION.values()}
        for (code, direction), (packets, size) in sorted(counters.items()):
            side = DIRECTION.get(direction, "UNKNOWN")
            if reasons.is_drop(code):
                drops.add_metric([reasons.name(code), side], packets)
                drop_bytes.add_metric([reasons.name(code), side], size)
            elif code not in NOT_FORWARDED:
                forwarded.setdefault(side, [0, 0])
                forwarded[side][0] += packets
                forwarded[side][1] += size
        for side, (packets, size) in forwarded.items():
            forwards.add_metric([side], packets)
            forward_bytes.add_metric([side], size)
        yield from (drops, drop_bytes, forwards, forward_bytes)
        pressure = GaugeMetricFamily("cilium_bpf_map_pressure", "Fill ratio of a BPF map (entries / max entries)",
                                     labels=["map_name"])
        for name, ratio in sorted(self.agent.map_pressure().items()):
            pressure.add_metric([name], ratio)
        yield pressure

    def _agent(self) -> Iterator[Metric]:
        status = self.agent.status()
        t = self.agent.telemetry
        yield GaugeMetricFamily("cilium_endpoint", "Endpoints managed by this agent", value=status["endpoints"])
        yield _counter("cilium_endpoint_regenerations", "Endpoint datapath programming, by outcome", ["outcome"],
                       t.counters("endpoint_regenerations"))
        yield _histogram("cilium_endpoint_regeneration_time_stats_seconds",
                         "Time to program an endpoint's datapath state", ["scope"],
                         t.histograms("endpoint_regeneration_seconds"))
        policy = status["policy"]
        yield GaugeMetricFamily("cilium_policy", "Policy rules in force", value=policy["rules"])
        yield GaugeMetricFamily("cilium_policy_max_revision", "Highest policy revision", value=policy["revision"])
        yield _counter("cilium_policy_change", "Policy imports and deletions, by outcome", ["outcome"],
                       t.counters("policy_changes"))
        identities = GaugeMetricFamily("cilium_identity", "Security identities known here", labels=["type"])
        kinds: dict[str, int] = {"reserved": 0, "local": 0, "cidr": 0}
        for number, labels, _ in self.agent.identity_list():
            kind = "reserved" if number < 256 else "cidr" if any(x.startswith("cidr:") for x in labels) else "local"
            kinds[kind] += 1
        for kind, n in kinds.items():
            identities.add_metric([kind], n)
        yield identities
        yield _counter("cilium_ipcache_events", "ipcache entries written and removed", ["type"],
                       t.counters("ipcache_events"))
        redirects = GaugeMetricFamily("cilium_proxy_redirects", "Policy entries redirecting to the L7 proxy",
                                      labels=["protocol"])
        for proto, n in sorted(self.agent.proxy_redirects().items()):
            redirects.add_metric([proto], n)
        yield redirects
        kv = self.kvstore()
        yield _histogram("cilium_kvstore_operations_duration_seconds", "kvstore operations, by action and outcome",
                         ["action", "kind", "outcome", "scope"], kv.histograms("kvstore_operation") if kv else iter(()))

    def _hubble(self, counters: dict[tuple[int, int], tuple[int, int]]) -> Iterator[Metric]:
        totals = self.flows.totals()
        processed = CounterMetricFamily("hubble_flows_processed", "Flows processed, by type and verdict",
                                        labels=["type", "subtype", "verdict"])
        for (etype, verdict), n in sorted(totals.flows.items()):
            processed.add_metric([HUBBLE_TYPES.get(etype, etype), "", verdict], n)
        yield processed
        verdicts = CounterMetricFamily("hubble_policy_verdicts", "Policy verdicts, by direction, match and action",
                                       labels=["direction", "match", "action"])
        for (direction, match, action), n in sorted(totals.verdicts.items()):
            verdicts.add_metric([direction, match, action], n)
        yield verdicts
        http = CounterMetricFamily("hubble_http_requests", "HTTP requests seen by the proxy",
                                   labels=["method", "protocol", "status", "reporter"])
        for (method, protocol, status), n in sorted(totals.http.items()):
            http.add_metric([method, protocol, status, "server"], n)
        yield http
        kafka = CounterMetricFamily("hubble_kafka_requests", "Kafka requests seen by the proxy",
                                    labels=["topic", "api_key", "error_code", "reporter"])
        for (topic, api_key, error_code), n in sorted(totals.kafka.items()):
            kafka.add_metric([topic, api_key, error_code, "server"], n)
        yield kafka
        lost = CounterMetricFamily("hubble_lost_events", "Events lost on the way, by where", labels=["source"])
        ring = sum(p for (code, _), (p, _) in counters.items() if code == EVENT_LOST)
        lost.add_metric(["perf_event_ring_buffer"], ring)  # the kernel's ring was full
        lost.add_metric(["observer_events_queue"], totals.lost)  # a slow follower
        yield lost


def _counter(name: str, text: str, labels: list[str], rows: Iterator[tuple[dict[str, str], int]]) -> Metric:
    family = CounterMetricFamily(name, text, labels=labels)
    for values, n in sorted(rows, key=lambda r: sorted(r[0].items())):
        family.add_metric([values.get(k, "") for k in labels], n)
    return family


def _histogram(name: str, text: str, labels: list[str], rows: Iterator[tuple[dict[str, str], Any]]) -> Metric:
    family = HistogramMetricFamily(name, text, labels=labels)
    for values, h in sorted(rows, key=lambda r: sorted(r[0].items())):
        family.add_metric([values.get(k, "") for k in labels], h.cumulative(), h.total)
    return family


def exposition(agent: Agent, flows: FlowLog, kvstore: Callable[[], Telemetry | None] = lambda: None) -> \
        Callable[[], tuple[bytes, str]]:
    """The /metrics body and its content type, computed per call."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, flows, kvstore))  # type: ignore[arg-type]
    # the classic text format (0.0.4), which every Prometheus 2.x reads; our names need no escaping
    return lambda: (generate_latest(registry), TEXT_FORMAT)
