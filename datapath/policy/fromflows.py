"""Policy judged against observed flows: the cases a set of flows (Hubble's shape) asks a policy
about, the report of which of them a new policy would deny or newly allow, and the least-privilege
policy that keeps every allowed flow allowed. Pure; the agent resolves the parties and traces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datapath.policy.l7 import KAFKA_API_KEYS, HttpRequest, KafkaRequest

PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMPv4": 1, "ICMPv6": 58}
POLICY_DROPS = {133, 181, 196}  # DROP_POLICY, DROP_POLICY_DENY, DROP_PROXY_REQUIRED: what policy decided
ENTITIES = {1: "host", 2: "world", 6: "remote-node"}


@dataclass(frozen=True)
class Case:
    """One question to the policy: may src reach dst on proto/port (with this L7 request)?"""

    src: str  # addresses, resolved by the agent as the datapath does
    dst: str
    proto: int
    port: int
    request: HttpRequest | KafkaRequest | None
    src_labels: tuple[str, ...]
    dst_labels: tuple[str, ...]
    l7: str = ""  # "GET /path" / "produce orders", for people

    def group(self) -> tuple[str, str, str, str]:
        name = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}.get(self.proto, str(self.proto))
        return (", ".join(self.src_labels), ", ".join(self.dst_labels), f"{self.port}/{name}", self.l7)


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].partition("/")[2]


def decided(flow: Mapping[str, Any]) -> bool:
    """Whether policy decided this flow: a new flow's verdict, a policy drop, an L7 request."""
    if flow.get("is_reply"):
        return False
    kind = (flow.get("event_type") or {}).get("type")
    if kind == 129:
        return True
    if kind == 5:
        return flow.get("verdict") != "TRANSLATED"  # a service translated it: no policy decision
    return kind == 1 and int(flow.get("drop_reason", 0)) in POLICY_DROPS


def case_of(flow: Mapping[str, Any]) -> Case | None:
    ip = flow.get("IP") or {}
    l4 = flow.get("l4") or {}
    if not ip.get("source") or not ip.get("destination") or not l4:
        return None
    kind, fields = next(iter(l4.items()))
    proto = PROTOCOLS.get(kind)
    if proto is None:
        return None
    port = int(fields.get("destination_port", 0)) if proto in (6, 17) else int(fields.get("type", 0))
    request: HttpRequest | KafkaRequest | None = None
    text = ""
    l7 = flow.get("l7") or {}
    if "http" in l7:
        http = l7["http"]
        host = str(http.get("url", "")).split("://", 1)[-1].partition("/")[0]
        request = HttpRequest(str(http.get("method", "")), _path(str(http.get("url", ""))), host)
        text = f"{request.method} {request.path}"
    elif "kafka" in l7:
        k = l7["kafka"]
        key = KAFKA_API_KEYS.get(str(k.get("api_key", "")).lower())
        if key is None:
            return None
        topics = (str(k["topic"]),) if k.get("topic") else ()
        request = KafkaRequest(key, int(k.get("api_version", 0)), None, topics)
        text = f"{k.get('api_key', '')} {k.get('topic', '')}".strip()
    src, dst = flow.get("source") or {}, flow.get("destination") or {}
    return Case(str(ip["source"]), str(ip["destination"]), proto, port, request,
                tuple(src.get("labels") or ()), tuple(dst.get("labels") or ()), text)


def cases(flows: Iterable[Mapping[str, Any]]) -> dict[Case, int]:
    """The distinct questions the flows ask, with how many flows asked each."""
    out: dict[Case, int] = {}
    for flow in flows:
        if decided(flow):
            c = case_of(flow)
            if c is not None:
                out[c] = out.get(c, 0) + 1
    return out


def report(asked: Mapping[Case, int], verdicts: Mapping[Case, tuple[bool, bool]]) -> dict[str, Any]:
    """Which flows the new policy would deny and which it would newly allow, grouped by labels,
    port and L7 request (`verdicts`: case -> (allowed now, allowed with the new policy))."""
    groups: dict[str, dict[tuple[str, str, str, str], int]] = {"newly_denied": {}, "newly_allowed": {}}
    unchanged = 0
    for case, count in asked.items():
        before, after = verdicts[case]
        if before == after:
            unchanged += count
            continue
        bucket = groups["newly_denied" if before else "newly_allowed"]
        bucket[case.group()] = bucket.get(case.group(), 0) + count
    out: dict[str, Any] = {"flows": sum(asked.values()), "unchanged": unchanged}
    for name, bucket in groups.items():
        out[name] = [{"from": g[0], "to": g[1], "port": g[2], "l7": g[3], "flows": n}
                     for g, n in sorted(bucket.items())]
    return out


# -- suggest ------------------------------------------------------------------------------------


def _selector(labels: Sequence[str]) -> dict[str, str]:
    """matchLabels for a label set: container labels by key, others with their source."""
    out = {}
    for text in labels:
        key, _, value = text.partition("=")
        if key.startswith("reserved:"):
            continue
        out[key.removeprefix("container:")] = value
    return out


def _peer(identity: int, labels: Sequence[str]) -> dict[str, Any] | None:
    if identity in ENTITIES:
        return {"fromEntities": [ENTITIES[identity]]}
    selector = _selector(labels)
    if not selector:
        return None  # an identity with no labels to select it by (unmanaged, init): left out
    return {"fromEndpoints": [{"matchLabels": selector}]}


def suggest(flows: Iterable[Mapping[str, Any]], is_local: Callable[[int], bool],
            wanted: Callable[[Sequence[str]], bool] = lambda labels: True) -> list[dict[str, Any]]:
    """Ingress rules, one per local destination identity whose labels `wanted` accepts, allowing
    exactly the (peer, port, protocol) of every allowed flow it received, with the HTTP method
    and path (or Kafka role and topic) of every request the proxy allowed on a port that was
    proxied. Reserved peers become entities (host, world)."""
    # destination identity -> (peer identity, peer labels, port, protocol) -> requests seen
    seen: dict[int, dict[tuple[int, tuple[str, ...], int, str], set[tuple[str, str]] | None]] = {}
    dst_labels: dict[int, tuple[str, ...]] = {}
    for flow in flows:
        if not decided(flow) or flow.get("verdict") not in ("FORWARDED", "REDIRECTED"):
            continue
        c = case_of(flow)
        dst = flow.get("destination") or {}
        number = int(dst.get("identity") or 0)
        if c is None or not is_local(number) or not wanted(c.dst_labels):
            continue
        dst_labels[number] = c.dst_labels
        src = flow.get("source") or {}
        proto = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}[c.proto]
        key = (int(src.get("identity") or 0), c.src_labels, c.port, proto)
        entry = seen.setdefault(number, {})
        if isinstance(c.request, HttpRequest):
            requests = entry.get(key) or set()
            requests.add(("http", f"{c.request.method} {c.request.path.partition('?')[0]}"))
            entry[key] = requests
        elif isinstance(c.request, KafkaRequest):
            requests = entry.get(key) or set()
            requests.add(("kafka", c.l7))
            entry[key] = requests
        else:
            entry.setdefault(key, None)
    rules = []
    for number in sorted(seen):
        ingress = []
        for (peer_id, peer_labels, port, proto), asked in sorted(seen[number].items(), key=lambda kv: str(kv[0])):
            peer = _peer(peer_id, peer_labels)
            if peer is None:
                continue
            to_port: dict[str, Any] = {"ports": [{"port": str(port), "protocol": proto}]}
            http = sorted(r for kind, r in asked or () if kind == "http")
            kafka = sorted(r for kind, r in asked or () if kind == "kafka")
            if http:
                to_port["rules"] = {"http": [{"method": m, "path": "^" + re.escape(p) + "$"}
                                             for m, p in (r.split(" ", 1) for r in http)]}
            elif kafka:
                to_port["rules"] = {"kafka": [_kafka_rule(r) for r in kafka]}
            ingress.append({**peer, "toPorts": [to_port]})
        if ingress:
            selector = _selector(dst_labels[number])
            rules.append({"labels": [{"key": "name", "value": "suggested-" + "-".join(
                              f"{k}-{v}" for k, v in sorted(selector.items()))[:200]}],
                          "endpointSelector": {"matchLabels": selector},
                          "ingress": ingress})
    return rules


def _kafka_rule(text: str) -> dict[str, str]:
    api_key, _, topic = text.partition(" ")
    rule = {"apiKey": api_key}
    if topic:
        rule["topic"] = topic
    return rule
