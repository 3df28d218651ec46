"""REST API requests parsed at the door into frozen values.

Our own format: unknown fields are refused and named; a bad value raises InvalidRequest.
Bodies come from plugin.api.wire.read_body, query strings from the request's args.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datapath.errors import InvalidRequest
from datapath.flows import FilterError, FlowFilter, FlowQuery, LabelSelector, parse_time
from datapath.labels import Label
from datapath.policy import Rule, parse_rules
from datapath.policy.l7 import KAFKA_KEY_NAMES, HttpRequest, KafkaRequest, normalize_path
from datapath.policy.trace import PROTO_NUMBERS, parse_dport

EVENT_TYPES = frozenset({"drop", "verdict", "trace", "l7"})
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: what a method is
PARTY_KINDS_HELP = ('send {"src": {KIND: VALUE}, "dst": {KIND: VALUE}, "dport": "80/tcp"} '
                    "with KIND endpoint, identity, labels or ip")


def labels_arg(text: str) -> list[Label] | None:
    """`k=v,k=v` (a query argument) as labels; None when empty."""
    if not text.strip():
        return None
    terms = [t.strip() for t in text.split(",")]
    if not all(terms):  # "," would otherwise read as no labels at all: every rule
        raise InvalidRequest(f"labels {text[:80]!r}: an empty label")
    try:
        return [Label.parse(t, "unspec") for t in terms]
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


@dataclass(frozen=True)
class PolicyImport:
    rules: list[Rule]

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> PolicyImport:
        if set(body) - {"rules"} or "rules" not in body:
            raise InvalidRequest("send {\"rules\": [...]}")
        return cls(parse_rules(body["rules"]))


def _since(body: Mapping[str, Any], now: float) -> float:
    text = body.get("since", "10m")
    if not isinstance(text, str) or not text:
        raise InvalidRequest("since: give a duration (10m) or an RFC 3339 time")
    try:
        return parse_time(text, now)
    except FilterError as exc:
        raise InvalidRequest(f"since: {exc}") from None


@dataclass(frozen=True)
class PolicyPreview:
    """POST /v1/policy/preview: what importing `rules` would change for the flows seen since."""

    rules: list[Rule]
    since: float

    @classmethod
    def parse(cls, body: Mapping[str, Any], now: float) -> PolicyPreview:
        unknown = set(body) - {"rules", "since"}
        if unknown or "rules" not in body:
            raise InvalidRequest('send {"rules": [...], "since": "10m"}' +
                                 (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        return cls(parse_rules(body["rules"]), _since(body, now))


@dataclass(frozen=True)
class PolicySuggest:
    """POST /v1/policy/suggest: the least-privilege ingress policy for the flows seen since."""

    selector: LabelSelector | None
    since: float

    @classmethod
    def parse(cls, body: Mapping[str, Any], now: float) -> PolicySuggest:
        unknown = set(body) - {"selector", "since"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))} (known: selector, since)")
        text = body.get("selector", "")
        if not isinstance(text, str):
            raise InvalidRequest("selector: give labels such as app=backend")
        try:
            selector = LabelSelector.parse(text) if text else None
        except FilterError as exc:
            raise InvalidRequest(f"selector: {exc}") from None
        return cls(selector, _since(body, now))


@dataclass(frozen=True)
class PolicyQuery:
    labels: list[Label] | None
    text: str

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> PolicyQuery:
        text = args.get("labels", "")
        return cls(labels_arg(text), text)


@dataclass(frozen=True)
class PolicyDelete:
    labels: list[Label] | None  # None: every rule (the caller sent all: true)

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> PolicyDelete:
        if set(body) - {"labels", "all"}:
            raise InvalidRequest("send {\"labels\": [\"k=v\", ...]} or {\"all\": true}")
        if not isinstance(body.get("all", False), bool):
            raise InvalidRequest("all must be true or false")
        if body.get("all") is True:
            if body.get("labels") is not None:
                raise InvalidRequest("give labels or all: true, not both")
            return cls(None)
        raw = body.get("labels")
        terms = [t.strip() for x in raw for t in x.split(",")] \
            if isinstance(raw, list) and all(isinstance(x, str) for x in raw) else []
        labels = labels_arg(",".join(terms)) if terms and all(terms) else None
        if not labels:  # never None here: that would delete every rule
            raise InvalidRequest("labels must be a non-empty list of key=value strings (or send all: true)")
        return cls(labels)


@dataclass(frozen=True)
class PolicyWait:
    revision: int
    timeout: float  # seconds, 0 to 300

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> PolicyWait:
        try:
            revision = int(args.get("revision", ""))
            timeout = float(args.get("timeout", "30"))
        except ValueError:
            raise InvalidRequest("revision must be a number (and timeout seconds)") from None
        if not math.isfinite(timeout):  # NaN would never pass the deadline
            raise InvalidRequest("timeout must be a finite number of seconds")
        return cls(revision, min(max(timeout, 0.0), 300.0))


@dataclass(frozen=True)
class PartySpec:
    kind: str  # endpoint, identity, labels or ip (the use case judges the kind and the value)
    value: str

    @classmethod
    def parse(cls, spec: Mapping[str, Any], side: str) -> PartySpec:
        if len(spec) != 1:
            raise InvalidRequest(f"{side}: give exactly one of endpoint, identity, labels, ip")
        ((kind, value),) = spec.items()
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InvalidRequest(f"{side}.{kind}: must be a string")
        return cls(str(kind), str(value))


@dataclass(frozen=True)
class TraceRequest:
    src: PartySpec
    dst: PartySpec
    dport: str
    request: HttpRequest | KafkaRequest | None = None  # an L7 request to decide as the proxy would

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> TraceRequest:
        unknown = set(body) - {"src", "dst", "dport", "http", "kafka"}
        if unknown or not isinstance(body.get("src"), dict) or not isinstance(body.get("dst"), dict):
            raise InvalidRequest(PARTY_KINDS_HELP)
        src, dst = (PartySpec.parse(body[side], side) for side in ("src", "dst"))
        dport = body.get("dport") or ""
        if not isinstance(dport, str):
            raise InvalidRequest("dport must be a string like 80/tcp")
        try:
            proto, _ = parse_dport(dport) if dport else (PROTO_NUMBERS["tcp"], 0)
        except ValueError as exc:
            raise InvalidRequest(f"dport: {exc}") from None
        if proto != PROTO_NUMBERS["tcp"] and (body.get("http") is not None or body.get("kafka") is not None):
            raise InvalidRequest(f"dport {dport}: HTTP and Kafka requests go over TCP")
        if body.get("http") is not None and body.get("kafka") is not None:
            raise InvalidRequest("trace an http or a kafka request, not both")
        request: HttpRequest | KafkaRequest | None = None
        if body.get("http") is not None:
            request = _http_request(body["http"])
        elif body.get("kafka") is not None:
            request = _kafka_request(body["kafka"])
        return cls(src, dst, dport, request)


def _text(raw: Mapping[str, Any], key: str, where: str, default: str = "") -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or len(value) > 8192:
        raise InvalidRequest(f"{where}.{key} must be a string (at most 8192 characters)")
    return value


def _http_request(raw: Any) -> HttpRequest:
    if not isinstance(raw, dict) or set(raw) - {"method", "path", "host", "headers"}:
        raise InvalidRequest("http must be an object with method, path, host and headers (a list of 'Name: value')")
    headers = raw.get("headers")
    headers = [] if headers is None else headers  # null: none; "" or {} are not a list
    if not isinstance(headers, list) or len(headers) > 100 or not all(isinstance(h, str) for h in headers):
        raise InvalidRequest("http.headers must be a list of at most 100 'Name: value' strings")
    pairs = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not name.strip():
            raise InvalidRequest(f"http.headers: {h!r} is not 'Name: value'")
        pairs.append((name.strip(), value.strip() if sep else ""))
    path = _text(raw, "path", "http", "/")
    if not path.startswith("/") and path != "*":
        raise InvalidRequest("http.path must start with '/'")
    method = _text(raw, "method", "http", "GET")
    if not HTTP_TOKEN.fullmatch(method):
        raise InvalidRequest(f"http.method {method[:40]!r} is not an HTTP method (a token: letters, no spaces)")
    return HttpRequest(_text(raw, "method", "http", "GET").upper(), normalize_path(path), _text(raw, "host", "http"),
                       tuple(pairs))


# Every name a rule's apiKey takes (and the few more traces name), so any rule can be traced by name.
KAFKA_KEYS = {name: key for key, name in sorted(KAFKA_KEY_NAMES.items())}


def _kafka_request(raw: Any) -> KafkaRequest:
    if not isinstance(raw, dict) or set(raw) - {"apiKey", "apiVersion", "clientID", "topics"}:
        raise InvalidRequest("kafka must be an object with apiKey, apiVersion, clientID and topics")
    key = raw.get("apiKey", "produce")
    digits = isinstance(key, str) and key.isascii() and key.isdigit()  # not "²" (int() refuses it)
    if isinstance(key, str) and not digits:
        if key.lower() not in KAFKA_KEYS:
            raise InvalidRequest(f"kafka.apiKey {key!r}: one of {', '.join(KAFKA_KEYS)} or a number")
        number = KAFKA_KEYS[key.lower()]
    elif digits and int(key) < 32768:
        number = int(key)
    elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 32768:
        number = key
    else:
        raise InvalidRequest("kafka.apiKey must be a name or a number")
    version = raw.get("apiVersion", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 32768:
        raise InvalidRequest("kafka.apiVersion must be a number")
    topics = raw.get("topics")
    topics = [] if topics is None else topics
    if not isinstance(topics, list) or len(topics) > 100 or not all(isinstance(t, str) for t in topics):
        raise InvalidRequest("kafka.topics must be a list of topic names")
    client = raw.get("clientID")
    if client is not None and not isinstance(client, str):
        raise InvalidRequest("kafka.clientID must be a string")
    return KafkaRequest(number, version, client, tuple(topics))


SERVICE_FIELDS = ("name", "frontend", "backends", "selector", "target_port")


def service_body(body: Mapping[str, Any], name: str = "") -> Mapping[str, Any]:
    """A service create (or, with the service's `name`, update) body: our own format, so unknown
    fields are refused by name; the values are the use case's to judge (datapath.services)."""
    unknown = sorted(set(body) - set(SERVICE_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(repr(k)[:40] for k in unknown)} "
                             f"(known: {', '.join(SERVICE_FIELDS)})")
    if name and body.get("name") not in (None, name):
        raise InvalidRequest(f"name {body['name']!r:.80}: a service keeps its name (this is {name})")
    return body


@dataclass(frozen=True)
class IpamCheck:
    release: bool
    grace: float

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> IpamCheck:
        unknown = set(body) - {"release", "grace"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        release = body.get("release", False)
        grace = body.get("grace", 60.0)
        if not isinstance(release, bool):
            raise InvalidRequest("release must be true or false")
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
            raise InvalidRequest("grace must be a number of seconds >= 0")
        return cls(release, float(grace))


@dataclass(frozen=True)
class MonitorQuery:
    type: str  # "" = drops and verdicts (traces only when asked for)
    endpoint: str  # endpoint ID prefix, "" = every endpoint

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> MonitorQuery:
        wanted = args.get("type", "")
        if wanted and wanted not in EVENT_TYPES:
            raise InvalidRequest(f"unknown event type {wanted!r} (known: {', '.join(sorted(EVENT_TYPES))})")
        return cls(wanted, args.get("endpoint", ""))

    def accepts(self, ev: Mapping[str, Any]) -> bool:
        if self.type and ev.get("type") != self.type:
            return False
        if not self.type and ev.get("type") == "trace":
            return False  # traces only when asked for
        return not self.endpoint or str(ev.get("endpoint", "")).startswith(self.endpoint)


FLOWS_ARGS = frozenset({"last", "first", "since", "until", "follow", "allowlist", "denylist"})
MAX_FLOWS = 1 << 20


@dataclass(frozen=True)
class FlowsQuery:
    """GET /v1/flows: which flows (Hubble's allowlist/denylist of FlowFilters, as JSON) and how many:
    the last N (default 20 unless since/until/follow is given), the first N, since/until a time."""

    query: FlowQuery
    last: int
    first: int
    since: float
    until: float
    follow: bool

    @classmethod
    def parse(cls, args: Mapping[str, str], now: float) -> FlowsQuery:
        unknown = set(args) - FLOWS_ARGS
        if unknown:
            raise InvalidRequest(f"unknown flow query argument(s): {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(sorted(FLOWS_ARGS))})")
        try:
            lists = {}
            for name in ("allowlist", "denylist"):
                try:
                    raw = json.loads(args.get(name) or "[]")
                except json.JSONDecodeError as exc:
                    raise FilterError(f"{name}: not JSON ({exc})") from None
                if not isinstance(raw, list) or len(raw) > 64:
                    raise FilterError(f"{name}: give a JSON list of at most 64 flow filters")
                lists[name] = tuple(FlowFilter.parse(item) for item in raw)
            since = parse_time(args["since"], now) if args.get("since") else 0.0
            until = parse_time(args["until"], now) if args.get("until") else 0.0
        except (FilterError, json.JSONDecodeError) as exc:
            raise InvalidRequest(str(exc)) from None
        follow = _bool_arg(args.get("follow", ""), "follow")
        last, first = _count_arg(args, "last"), _count_arg(args, "first")
        if last and first:
            raise InvalidRequest("give last or first, not both")
        if first and follow:
            raise InvalidRequest("first cannot follow: it reads from the oldest flow")
        if not (last or first or since or until or follow):
            last = 20
        return cls(FlowQuery(lists["allowlist"], lists["denylist"]), last, first, since, until, follow)


def _bool_arg(text: str, name: str) -> bool:
    if text.lower() in ("", "0", "false", "no"):
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    raise InvalidRequest(f"{name}: {text!r} is not true or false")


def _count_arg(args: Mapping[str, str], name: str) -> int:
    text = args.get(name, "")
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_FLOWS:  # "²".isdigit() is true
        raise InvalidRequest(f"{name}: {text!r} is not a count (1-{MAX_FLOWS})")
    return int(text)
