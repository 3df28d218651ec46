"""Flows: datapath and L7 events in Hubble's shape (`flow.Flow` as `hubble observe -o json` prints
it), and Hubble's flow filters (`FlowFilter`: fields ANDed, values of a field ORed; an allowlist of
filters ORed, a denylist excluding).

Pure: event dicts in (datapath.events.decode plus the agent's enrichment, or the proxy's L7
events), flow dicts and booleans out. Imports datapath.events and datapath.reasons only.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from datapath import events, reasons

# Hubble's DropReason names where a cellgate code means the same as Cilium's; the others keep
# cellgate's constant (datapath.reasons) without the DROP_ prefix.
DROP_REASON_NAMES = {
    130: "INVALID_SOURCE_MAC", 131: "INVALID_DESTINATION_MAC", 132: "INVALID_SOURCE_IP", 133: "POLICY_DENIED",
    134: "INVALID_PACKET_DROPPED", 139: "UNSUPPORTED_L3_PROTOCOL", 155: "CT_MAP_INSERTION_FAILED",
    157: "IP_FRAGMENTATION_NOT_SUPPORTED", 181: "POLICY_DENY",
}
VERDICTS = ("FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED")
# Hubble's event_type.type: the monitor message kinds
EVENT_TYPE = {"drop": 1, "trace": 4, "verdict": 5, "l7": 129}
EVENT_TYPE_NAMES = {"drop": "drop", "trace": "trace", "policy-verdict": "verdict", "l7": "l7"}
_EVENT_TYPE_BY_NUMBER = {1: "drop", 4: "trace", 5: "policy-verdict", 129: "l7"}
FLOW_TYPES = ("L3_L4", "L7")
DIRECTIONS = ("INGRESS", "EGRESS")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv4", "icmpv6", "http", "kafka")
REDIRECTED = {13}  # CG_OK_PROXY
TRANSLATED = events.TRANSLATED


def drop_reason_desc(code: int) -> str:
    if code in DROP_REASON_NAMES:
        return DROP_REASON_NAMES[code]
    return reasons.constant(code).removeprefix("DROP_")


_SECOND: list[tuple[int, str]] = [(-1, "")]  # the last whole second formatted (flows come in bursts)


def rfc3339(seconds: float) -> str:
    whole = int(seconds)
    cached = _SECOND[0]  # one read and one write of a tuple: safe between threads
    if cached[0] != whole:
        cached = (whole, datetime.datetime.fromtimestamp(whole, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _SECOND[0] = cached
    return f"{cached[1]}.{min(round((seconds - whole) * 1e9), 999_999_999):09d}Z"


def verdict_of(ev: Mapping[str, Any]) -> str:
    kind = ev.get("type")
    if kind == "l7":
        return {"forwarded": "FORWARDED", "denied": "DROPPED"}.get(str(ev.get("verdict")), "ERROR")
    code = int(ev.get("code", 0))
    if code >= reasons.FIRST_DROP:
        return "DROPPED"
    if code in REDIRECTED:
        return "REDIRECTED"
    if code in TRANSLATED:
        return "TRANSLATED"
    return "FORWARDED"


def _split(address: str) -> tuple[str, int]:
    """'10.0.0.1:80' or '[fd00::1]:80' (the L7 events' form) → (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


@dataclass(frozen=True)
class Names:
    """What the agent knows beyond the event: this node, and the service of a backend."""

    node: str
    services: Mapping[tuple[str, int, int], str] = field(default_factory=dict)  # frontend or backend → name
    endpoints: Mapping[str, str] = field(default_factory=dict)  # address → local endpoint ID


def to_flow(ev: Mapping[str, Any], names: Names, uuid: str = "") -> dict[str, Any]:
    """One event as a Hubble Flow (the `flow` object of a GetFlowsResponse)."""
    kind = str(ev.get("type", ""))
    verdict = verdict_of(ev)
    flow: dict[str, Any] = {"time": rfc3339(float(ev["time"])), "verdict": verdict}
    if uuid:
        flow["uuid"] = uuid
    src: dict[str, Any] = {"identity": int(ev.get("src_identity") or 0), "labels": ev.get("src_labels") or []}
    dst: dict[str, Any] = {"identity": int(ev.get("dst_identity") or 0), "labels": ev.get("dst_labels") or []}
    if kind == "l7":
        saddr, sport = _split(str(ev.get("src", "")))
        daddr, dport = _split(str(ev.get("dst", "")))
        proto = "tcp"
        flow["Type"] = "L7"
        flow["traffic_direction"] = "INGRESS" if ev.get("side") == "ingress" else "EGRESS"
        flow["trace_observation_point"] = "TO_PROXY"
        flow["is_reply"] = False
        flow["l7"], flow["Summary"] = _l7(ev)
    else:
        saddr, daddr = str(ev.get("src", "")), str(ev.get("dst", ""))
        sport, dport = int(ev.get("sport", 0)), int(ev.get("dport", 0))
        proto = str(ev.get("protocol", ""))
        flow["Type"] = "L3_L4"
        code = int(ev.get("code", 0))
        if verdict == "DROPPED":
            flow["drop_reason"] = code
            flow["drop_reason_desc"] = drop_reason_desc(code)
        if ev.get("src_mac"):
            flow["ethernet"] = {"source": ev["src_mac"], "destination": ev.get("dst_mac", "")}
        side = ev.get("side") or ("egress" if ev.get("direction") == "from-endpoint" else "ingress")
        flow["traffic_direction"] = "EGRESS" if side == "egress" else "INGRESS"
        flow["trace_observation_point"] = "FROM_ENDPOINT" if ev.get("direction") == "from-endpoint" else "TO_ENDPOINT"
        flow["is_reply"] = ev.get("ct_state") == "reply"
        flow["Summary"] = _summary(ev, proto)
        if ev.get("ifindex"):
            flow["interface"] = {"index": int(ev["ifindex"])}
    if saddr and daddr:
        flow["IP"] = {"source": saddr, "destination": daddr, "ipVersion": "IPv6" if ":" in saddr else "IPv4"}
    l4 = _l4(ev, proto, sport, dport)
    if l4:
        flow["l4"] = l4
    for party, address in ((src, saddr), (dst, daddr)):
        local = names.endpoints.get(address)
        if local:  # a local endpoint: named by the first 12 characters of its ID
            party["pod_name"] = local[:12]
    endpoint = str(ev.get("endpoint") or "")
    if endpoint and "pod_name" not in src and "pod_name" not in dst:  # the endpoint the event was seen at
        (src if ev.get("direction") == "from-endpoint" else dst)["pod_name"] = endpoint[:12]
    flow["source"], flow["destination"] = src, dst
    flow["node_name"] = names.node
    # A policy denial is reported twice, as Cilium does: its policy verdict (5) and its drop (1).
    flow["event_type"] = {"type": EVENT_TYPE.get(kind, 0)}
    if names.services and daddr and dport and proto in ("tcp", "udp"):
        service = names.services.get((daddr, dport, 6 if proto == "tcp" else 17))
        if service:
            flow["destination_service"] = {"name": service}
    return flow


def _l4(ev: Mapping[str, Any], proto: str, sport: int, dport: int) -> dict[str, Any]:
    if proto == "tcp":
        return {"TCP": {"source_port": sport, "destination_port": dport}}
    if proto == "udp":
        return {"UDP": {"source_port": sport, "destination_port": dport}}
    if proto in ("icmp", "icmpv6"):
        return {"ICMPv4" if proto == "icmp" else "ICMPv6": {"type": int(ev.get("icmp_type", 0)),
                                                           "code": int(ev.get("icmp_code", 0))}}
    return {}


def _summary(ev: Mapping[str, Any], proto: str) -> str:
    if ev.get("type") == "drop":
        return f"{proto.upper() or ev.get('ethertype', '').upper()} {ev.get('reason', '')}".strip()
    if proto in ("icmp", "icmpv6"):
        family = "ICMPv4" if proto == "icmp" else "ICMPv6"
        return f"{family} type {ev.get('icmp_type', 0)} code {ev.get('icmp_code', 0)}"
    return proto.upper() or str(ev.get("ethertype", "")).upper()


def _l7(ev: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if ev.get("l7") == "kafka":
        k = ev.get("kafka") or {}
        topics = list(k.get("topics") or [])
        kafka = {"error_code": int(k.get("error_code", 0)), "api_version": int(k.get("api_version", 0)),
                 "api_key": str(k.get("api_key_name", k.get("api_key", ""))),
                 "correlation_id": int(k.get("correlation_id", 0)), "topic": topics[0] if topics else ""}
        return ({"type": "REQUEST", "kafka": kafka},
                f"Kafka request {kafka['api_key']} correlation id {kafka['correlation_id']} topic '{kafka['topic']}'")
    h = ev.get("http") or {}
    status = h.get("status", h.get("grpc_status", 0))
    http: dict[str, Any] = {"code": int(status) if str(status).isdigit() else 0, "method": str(h.get("method", "")),
                            "url": f"http://{h.get('host', '')}{h.get('path', '')}",
                            "protocol": str(h.get("protocol", "HTTP/1.1"))}
    return ({"type": "RESPONSE" if http["code"] else "REQUEST", "http": http},
            f"{http['protocol']} {http['code']} {http['method']} {http['url']}")


def response(flow: dict[str, Any]) -> dict[str, Any]:
    """A GetFlowsResponse line of `hubble observe -o json`."""
    return {"flow": flow, "node_name": flow.get("node_name", ""), "time": flow["time"]}


# -- filters ----------------------------------------------------------------------------------


class FilterError(ValueError):
    """A filter that names an unknown field or holds a value that cannot match anything."""


@dataclass(frozen=True)
class LabelSelector:
    """`key=value`, `key!=value`, `key` and `!key` requirements, comma-separated and ANDed; a key may
    carry its source (`container:app`, `reserved:world`), else any source matches."""

    requirements: tuple[tuple[str, str, str], ...]  # (op, key, value), op in "=", "!=", "exists", "!"

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        reqs = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                raise FilterError(f"label selector {text!r}: an empty requirement")
            if "!=" in part:
                key, value = part.split("!=", 1)
                reqs.append(("!=", key.strip(), value.strip()))
            elif "=" in part:
                key, value = part.split("=", 1)
                reqs.append(("=", key.strip().rstrip("="), value.strip()))
            elif part.startswith("!"):
                reqs.append(("!", part[1:].strip(), ""))
            else:
                reqs.append(("exists", part, ""))
            if not reqs[-1][1] or not re.fullmatch(r"[A-Za-z0-9_.:/-]+", reqs[-1][1]):
                raise FilterError(f"label selector {text!r}: bad key {reqs[-1][1]!r}")
        return cls(tuple(reqs))

    def matches(self, labels: Iterable[str]) -> bool:
        pairs = [_label_pair(text) for text in labels]
        for op, key, value in self.requirements:
            values = [v for k, v in pairs if _key_matches(key, k)]
            if op == "=" and value not in values:
                return False
            if op == "!=" and value in values:
                return False
            if op == "exists" and not values:
                return False
            if op == "!" and values:
                return False
        return True


def _label_pair(text: str) -> tuple[str, str]:
    """'container:app=web' → ('container:app', 'web'); 'reserved:world' → ('reserved:world', '')."""
    key, _, value = text.partition("=")
    return key, value


def _key_matches(wanted: str, have: str) -> bool:
    return wanted == have or (":" not in wanted and have.split(":", 1)[-1] == wanted)


def _status_matcher(text: str) -> Callable[[int], bool]:
    """'404' exactly, or '5+' (500-599), as `hubble observe --http-status`."""
    if re.fullmatch(r"[1-5][0-9][0-9]", text):
        return lambda code: code == int(text)
    if re.fullmatch(r"[1-5]\+", text):
        return lambda code: code // 100 == int(text[0])
    raise FilterError(f"http status {text!r}: give a code (404) or a class (5+)")


@dataclass(frozen=True)
class FlowFilter:
    """Hubble's FlowFilter, the fields cellgate knows (JSON names as Hubble's)."""

    source_ip: tuple[str, ...] = ()
    destination_ip: tuple[str, ...] = ()
    source_label: tuple[str, ...] = ()
    destination_label: tuple[str, ...] = ()
    source_identity: tuple[int, ...] = ()
    destination_identity: tuple[int, ...] = ()
    source_port: tuple[str, ...] = ()
    destination_port: tuple[str, ...] = ()
    source_pod: tuple[str, ...] = ()
    destination_pod: tuple[str, ...] = ()
    destination_service: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    verdict: tuple[str, ...] = ()
    event_type: tuple[str, ...] = ()  # drop, trace, policy-verdict, l7
    http_status_code: tuple[str, ...] = ()
    http_method: tuple[str, ...] = ()
    http_path: tuple[str, ...] = ()
    node_name: tuple[str, ...] = ()
    traffic_direction: tuple[str, ...] = ()
    reply: tuple[bool, ...] = ()
    ip_version: tuple[str, ...] = ()
    _compiled: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, data: Any) -> FlowFilter:
        """From Hubble's JSON FlowFilter; unknown fields and bad values are refused by name (a
        filter silently ignored would show flows the user asked not to see)."""
        if not isinstance(data, Mapping):
            raise FilterError(f"a flow filter is an object, not {type(data).__name__}")
        known = {f.name: f for f in fields(cls) if not f.name.startswith("_")}
        values: dict[str, Any] = {}
        for name, raw in data.items():
            if name not in known:
                raise FilterError(f"unknown flow filter field {name!r} (known: {', '.join(sorted(known))})")
            items = raw if isinstance(raw, list) else [raw]
            if name == "event_type":  # Hubble's [{"type": 1}] or cellgate's names
                items = [i.get("type") if isinstance(i, Mapping) else i for i in items]
                items = [_EVENT_TYPE_BY_NUMBER.get(i, i) if isinstance(i, int) else i for i in items]
            values[name] = tuple(_value(name, item) for item in items)
        return cls(**values).compiled()

    def to_json(self) -> dict[str, Any]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)
                if not f.name.startswith("_") and getattr(self, f.name)}

    def empty(self) -> bool:
        return not self.to_json()

    def compiled(self) -> FlowFilter:
        nets = tuple(tuple(ipaddress.ip_network(v, strict=False) for v in vs)
                     for vs in (self.source_ip, self.destination_ip))
        labels = tuple(tuple(LabelSelector.parse(v) for v in vs) for vs in (self.source_label, self.destination_label))
        status = tuple(_status_matcher(v) for v in self.http_status_code)
        paths = tuple(re.compile(v) for v in self.http_path)
        return replace(self, _compiled=(nets, labels, status, paths))

    def matches(self, flow: Mapping[str, Any]) -> bool:
        if not self._compiled:
            return self.compiled().matches(flow)
        nets, labels, status, paths = self._compiled
        ip = flow.get("IP") or {}
        for wanted, address in zip(nets, (ip.get("source"), ip.get("destination")), strict=True):
            if wanted and not (address and any(ipaddress.ip_address(address) in n for n in wanted)):
                return False
        src, dst = flow.get("source") or {}, flow.get("destination") or {}
        for selectors, party in zip(labels, (src, dst), strict=True):
            if selectors and not any(s.matches(party.get("labels") or []) for s in selectors):
                return False
        if self.source_identity and src.get("identity") not in self.source_identity:
            return False
        if self.destination_identity and dst.get("identity") not in self.destination_identity:
            return False
        if self.source_pod and not any(str(src.get("pod_name", "")).startswith(p) for p in self.source_pod):
            return False
        if self.destination_pod and not any(str(dst.get("pod_name", "")).startswith(p) for p in self.destination_pod):
            return False
        l4: Mapping[str, Any] = next(iter((flow.get("l4") or {}).values()), {})
        if self.source_port and str(l4.get("source_port", "")) not in self.source_port:
            return False
        if self.destination_port and str(l4.get("destination_port", "")) not in self.destination_port:
            return False
        if self.destination_service and (flow.get("destination_service") or {}).get("name") \
                not in self.destination_service:
            return False
        if self.protocol and not _protocol_matches(self.protocol, flow):
            return False
        if self.verdict and flow.get("verdict") not in self.verdict:
            return False
        if self.event_type and not any(EVENT_TYPE[EVENT_TYPE_NAMES[t]] == flow.get("event_type", {}).get("type")
                                       for t in self.event_type):
            return False
        if self.node_name and flow.get("node_name") not in self.node_name:
            return False
        if self.traffic_direction and flow.get("traffic_direction") not in self.traffic_direction:
            return False
        if self.reply and bool(flow.get("is_reply")) not in self.reply:
            return False
        if self.ip_version and ip.get("ipVersion") not in self.ip_version:
            return False
        return self._http_matches(flow, status, paths)

    def _http_matches(self, flow: Mapping[str, Any], status: Sequence[Callable[[int], bool]],
                      paths: Sequence[re.Pattern[str]]) -> bool:
        if not (status or self.http_method or paths):
            return True
        http = (flow.get("l7") or {}).get("http")
        if http is None:
            return False
        if status and not any(m(int(http.get("code", 0))) for m in status):
            return False
        if self.http_method and str(http.get("method", "")).upper() not in {m.upper() for m in self.http_method}:
            return False
        path = "/" + str(http.get("url", "")).split("://", 1)[-1].partition("/")[2]
        return not paths or any(p.search(path) for p in paths)


def _protocol_matches(wanted: Sequence[str], flow: Mapping[str, Any]) -> bool:
    l4 = flow.get("l4") or {}
    l7 = flow.get("l7") or {}
    have = {k.lower() for k in l4} | {k for k in ("http", "kafka") if k in l7}
    if "icmpv4" in have:
        have.add("icmp")
    return any(w in have for w in wanted)


# filter fields with a closed set of values: (name in messages, normalisation, the values)
ENUMERATED: dict[str, tuple[str, Callable[[str], str], Sequence[str]]] = {
    "protocol": ("protocol", str.lower, PROTOCOLS),
    "verdict": ("verdict", str.upper, VERDICTS),
    "event_type": ("type", lambda text: text, tuple(EVENT_TYPE_NAMES)),
    "traffic_direction": ("traffic_direction", str.upper, DIRECTIONS),
    "ip_version": ("ip_version", lambda text: {"4": "IPv4", "6": "IPv6", "ipv4": "IPv4", "ipv6": "IPv6"}.get(
        text.lower(), text), ("IPv4", "IPv6")),
}


def _value(name: str, item: Any) -> Any:
    if name in ("source_identity", "destination_identity"):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 1 << 32:
            raise FilterError(f"{name}: {item!r} is not an identity number")
        return item
    if name == "reply":
        if not isinstance(item, bool):
            raise FilterError(f"reply: {item!r} is not true or false")
        return item
    if not isinstance(item, str) or not item or len(item) > 512:
        raise FilterError(f"{name}: {item!r} is not a non-empty string")
    if name in ("source_ip", "destination_ip"):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise FilterError(f"{name}: {item!r} is not an address or CIDR") from None
    elif name in ("source_port", "destination_port"):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise FilterError(f"{name}: {item!r} is not a port (1-65535)")
    elif name in ENUMERATED:
        shown, normal, known = ENUMERATED[name]
        item = normal(item)
        if item not in known:
            raise FilterError(f"{shown}: {item!r} (known: {', '.join(known)})")
    elif name in ("source_label", "destination_label"):
        LabelSelector.parse(item)
    elif name == "http_status_code":
        _status_matcher(item)
    elif name == "http_path":
        try:
            re.compile(item)
        except re.error as exc:
            raise FilterError(f"http_path: {item!r} is not a regular expression: {exc}") from None
    return item


@dataclass(frozen=True)
class FlowQuery:
    """Which flows: the allowlist (ORed; empty = all) minus the denylist (ORed)."""

    allow: tuple[FlowFilter, ...] = ()
    deny: tuple[FlowFilter, ...] = ()

    def accepts(self, flow: Mapping[str, Any]) -> bool:
        if self.allow and not any(f.matches(flow) for f in self.allow):
            return False
        return not any(f.matches(flow) for f in self.deny)


# -- the CLI's flags, as `hubble observe` turns them into filters --------------------------------

# flag → (field for the source side, field for the destination side); `--X` sets the source
# field in one filter and the destination field in another (either side), `--from-X` the
# source in both, `--to-X` the destination in both.
TWO_SIDED = {"ip": ("source_ip", "destination_ip"), "label": ("source_label", "destination_label"),
             "identity": ("source_identity", "destination_identity"), "port": ("source_port", "destination_port"),
             "pod": ("source_pod", "destination_pod")}
ONE_SIDED = {"protocol": "protocol", "verdict": "verdict", "type": "event_type", "http_status": "http_status_code",
             "http_method": "http_method", "http_path": "http_path", "node_name": "node_name",
             "traffic_direction": "traffic_direction", "to_service": "destination_service",
             "ip_version": "ip_version"}


class FilterBuilder:
    """Hubble's filter tracker: flags in command-line order; `--not` makes the next one exclude."""

    def __init__(self) -> None:
        self._sides: dict[bool, list[dict[str, list[Any]]]] = {False: [{}, {}], True: [{}, {}]}
        self._split = {False: False, True: False}
        self._negate = False

    def negate_next(self) -> None:
        self._negate = True

    def add(self, flag: str, value: Any) -> None:
        """`flag` without dashes, with underscores: ip, from_ip, to_ip, label, ..., protocol, verdict."""
        deny, self._negate = self._negate, False
        left, right = self._sides[deny]
        side, _, base = flag.partition("_") if flag.startswith(("from_", "to_")) and flag != "to_service" else \
            ("", "", flag)
        if base in TWO_SIDED:
            src, dst = TWO_SIDED[base]
            if side == "from":
                targets = [(left, src), (right, src)]
            elif side == "to":
                targets = [(left, dst), (right, dst)]
            else:
                targets = [(left, src), (right, dst)]
                self._split[deny] = True
        elif flag in ONE_SIDED:
            targets = [(left, ONE_SIDED[flag]), (right, ONE_SIDED[flag])]
        else:
            raise FilterError(f"unknown filter flag --{flag.replace('_', '-')}")
        for target, name in targets:
            target.setdefault(name, []).append(value)

    def query(self) -> FlowQuery:
        built: dict[bool, tuple[FlowFilter, ...]] = {}
        for deny in (False, True):
            left, right = self._sides[deny]
            chosen = [left, right] if self._split[deny] else [left]
            built[deny] = tuple(FlowFilter.parse(d) for d in chosen if d)
        return FlowQuery(built[False], built[True])


def parse_time(text: str, now: float) -> float:
    """`--since`/`--until`: a duration before now (`90s`, `5m`, `1h30m`) or an RFC 3339 time."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if text.strip() and match and any(match.groups()):
        h, m, s = match.groups()
        return now - (int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0))
    try:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"time {text!r}: give a duration (5m, 1h30m, 90s) or an RFC 3339 time") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


# -- rendering for people (`cellgate observe -o compact|table`) ----------------------------------


def _endpoint_text(party: Mapping[str, Any], address: str, port: int) -> str:
    where = (f"[{address}]:{port}" if ":" in address else f"{address}:{port}") if port else address
    labels = [text.split(":", 1)[-1] if text.startswith("container:") else text for text in party.get("labels") or []]
    who = f"ID:{party.get('identity', 0)}" + (f" {','.join(labels)}" if labels else "")
    return f"{where or '?'} ({who})"


def event_name(flow: Mapping[str, Any]) -> str:
    number = (flow.get("event_type") or {}).get("type")
    if number == EVENT_TYPE["l7"]:
        l7 = flow.get("l7") or {}
        return ("http-" if "http" in l7 else "kafka-") + str(l7.get("type", "request")).lower()
    if number == EVENT_TYPE["verdict"]:
        return "policy-verdict"
    if number == EVENT_TYPE["drop"]:
        return "drop"
    return str(flow.get("trace_observation_point", "trace")).lower().replace("_", "-")


def parties(flow: Mapping[str, Any]) -> tuple[str, str]:
    ip = flow.get("IP") or {}
    l4: Mapping[str, Any] = next(iter((flow.get("l4") or {}).values()), {})
    return (_endpoint_text(flow.get("source") or {}, str(ip.get("source", "")), int(l4.get("source_port", 0))),
            _endpoint_text(flow.get("destination") or {}, str(ip.get("destination", "")),
                           int(l4.get("destination_port", 0))))


def stamp(flow: Mapping[str, Any]) -> str:
    text = str(flow.get("time", ""))  # 2026-12-04T19:00:01.123456789Z
    try:
        when = datetime.datetime.fromisoformat(text[:26] + "+00:00")
    except ValueError:
        return text
    return when.astimezone().strftime("%b %d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def format_compact(resp: Mapping[str, Any], node: bool = False) -> str:
    flow = resp.get("flow") or {}
    src, dst = parties(flow)
    where = f" [{flow.get('node_name', '')}]" if node else ""
    verdict = str(flow.get("verdict", ""))
    if verdict == "DROPPED" and flow.get("drop_reason_desc"):
        verdict += f" ({flow['drop_reason_desc']})"
    arrow = "<-" if flow.get("is_reply") else "->"
    return (f"{stamp(flow)}{where}: {src} {arrow} {dst} {event_name(flow)} {flow.get('traffic_direction', '')} "
            f"{verdict} ({flow.get('Summary', '')})")


def format_table(responses: Iterable[Mapping[str, Any]], node: bool = False) -> str:
    rows = [("TIMESTAMP", *(("NODE",) if node else ()), "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")]
    for resp in responses:
        flow = resp.get("flow") or {}
        src, dst = parties(flow)
        rows.append((stamp(flow), *((str(flow.get("node_name", "")),) if node else ()), src, dst, event_name(flow),
                     str(flow.get("verdict", "")), str(flow.get("Summary", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "   " + r[-1]
                     for r in rows)
