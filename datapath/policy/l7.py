"""L7 rules of the policy language (Cilium's `toPorts[].rules.http` / `.kafka`), the requests the
proxy sees, and the verdict of a request under the merged rules of one policy entry. Pure; imports
the standard library and datapath.errors only. The proxy (plugin/proxy) and `policy trace` both
decide through L7Filter, so they cannot disagree.

HTTP (`PortRuleHTTP`): `method`, `path` and `host` are regular expressions that must match the
whole value (`re.fullmatch`, as Envoy's anchored `regex_match`): `/public` does not allow
`/public/x`. `path` is matched against the request target as sent, query string included (Envoy
matches `:path`, which holds it): `/a` does not allow `/a?x=1`; write `/a(\\?.*)?` for that.
Patterns are Python `re` syntax (what Cilium's RE2 and POSIX ERE patterns are written in reads the
same for the usual constructs), at most MAX_PATTERN characters, and case-sensitive as Envoy's.
`headers` entries are `"Name"` (the header is present) or `"Name: value"` (split at the first ':',
spaces stripped; a trailing ':' with no value means present): some header of that name (names
compare case-insensitively) has a value that fully matches `value` READ AS A REGULAR EXPRESSION.
Cilium compares that value as literal text; for values without regex characters (`true`, `v1`)
the result is the same, but `X-Token: [0-9]+` here means digits. `headerMatches` entries
{name, value?} compare the value as an exact string (as Cilium), no value meaning present;
`mismatch` actions and `secret`s are refused (not supported yet). The fields of one entry are
ANDed, entries are ORed, an empty entry `{}` allows every request.

Kafka (`PortRuleKafka`): `role` (produce/consume) or `apiKey` (a name of Cilium's KafkaAPIKeyMap),
not both; `apiVersion`, `clientID` exact; `topic` as Cilium: every topic a request names must be
allowed by some matching entry (entries of one filter add up: two entries for topics a and b allow
a request naming both), and the constraint is ignored for requests that name no topic. The roles
are Cilium's, EXTENDED for the clients of today (a strict expansion breaks them): producers also
get 22 InitProducerId (kafka-python 3 producers are idempotent by default) and 71
GetTelemetrySubscriptions (librdkafka sends it on every connection); consumers also get 23
OffsetForLeaderEpoch (sent by modern consumers after a leader change) and 71.

An L7Filter is what the compiler attaches to one policy entry: the Grants (one per policy rule
and toPorts entry) whose L7 rules cover it. A request passes if any grant allows it; the verdict
names that grant's rule and explains, one line per entry checked, why each did or did not match.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datapath.errors import InvalidRequest

HTTP, KAFKA = "http", "kafka"
KINDS = (HTTP, KAFKA)
MAX_PATTERN = 1024  # characters of one regular expression (a real path pattern is under 200)
MAX_TOPIC = 255  # Cilium's KafkaMaxTopicLen
MAX_API_VERSION = 32767  # an int16

# Cilium's KafkaAPIKeyMap (pkg/policy/api/kafka.go): the names `apiKey` takes.
KAFKA_API_KEYS: dict[str, int] = {
    "produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "leaderandisr": 4, "stopreplica": 5,
    "updatemetadata": 6, "controlledshutdown": 7, "offsetcommit": 8, "offsetfetch": 9, "findcoordinator": 10,
    "joingroup": 11, "heartbeat": 12, "leavegroup": 13, "syncgroup": 14, "describegroups": 15, "listgroups": 16,
    "saslhandshake": 17, "apiversions": 18, "createtopics": 19, "deletetopics": 20, "deleterecords": 21,
    "initproducerid": 22, "offsetforleaderepoch": 23, "addpartitionstotxn": 24, "addoffsetstotxn": 25,
    "endtxn": 26, "writetxnmarkers": 27, "txnoffsetcommit": 28, "describeacls": 29, "createacls": 30,
    "deleteacls": 31, "describeconfigs": 32, "alterconfigs": 33,
}
# Names for traces only (apiKey takes Cilium's names above, nothing else).
KAFKA_KEY_NAMES: dict[int, str] = {v: k for k, v in KAFKA_API_KEYS.items()} | {
    36: "saslauthenticate", 71: "gettelemetrysubscriptions", 72: "pushtelemetry"}
CILIUM_ROLES: dict[str, frozenset[int]] = {
    "produce": frozenset({0, 3, 18}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}
ROLES: dict[str, frozenset[int]] = {  # what a role allows here (see the module docstring)
    "produce": CILIUM_ROLES["produce"] | {22, 71},
    "consume": CILIUM_ROLES["consume"] | {23, 71},
}

_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
_DENIED = "no L7 rule allows this request"


# -- what the proxy sees ---------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # the request target as sent (origin form, query included), or `:path` in HTTP/2
    host: str  # Host header or `:authority`, "" if absent
    headers: tuple[tuple[str, str], ...] = ()  # (name, value) as received; names compare case-insensitively


@dataclass(frozen=True)
class KafkaRequest:
    api_key: int
    api_version: int
    client_id: str | None
    topics: tuple[str, ...] = ()  # every topic the request names (resolved from topic ids by the proxy)


@dataclass(frozen=True)
class L7Verdict:
    allowed: bool
    rule: int  # id of the policy rule whose L7 entry allowed it; 0 when denied
    steps: tuple[str, ...] = ()  # one line per rule/entry checked, for `policy trace`


# -- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderMatch:
    """A header that must be present, and if `value` is not None have a matching value: a full
    regex match in HttpRule.headers, an exact string in HttpRule.header_matches."""

    name: str
    value: str | None = None


@dataclass(frozen=True)
class HttpRule:
    """One entry of `rules.http`; "" / () = any."""

    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[HeaderMatch, ...] = ()  # `headers`: values are regular expressions
    header_matches: tuple[HeaderMatch, ...] = ()  # `headerMatches`: values are exact strings

    def to_json(self) -> dict[str, Any]:
        """The entry in the policy language (what parse_http_rule reads back as this rule)."""
        out: dict[str, Any] = {k: v for k, v in (("method", self.method), ("path", self.path),
                                                 ("host", self.host)) if v}
        if self.headers:
            out["headers"] = [h.name if h.value is None else f"{h.name}: {h.value}" for h in self.headers]
        if self.header_matches:
            out["headerMatches"] = [{"name": h.name} if h.value is None else {"name": h.name, "value": h.value}
                                    for h in self.header_matches]
        return out

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("method", self.method), ("path", self.path), ("host", self.host)) if v]
        if self.headers:
            parts.append("headers [" + ", ".join(h.name if h.value is None else f"{h.name}: {h.value}"
                                                 for h in self.headers) + "]")
        if self.header_matches:
            parts.append("headerMatches [" + ", ".join(h.name if h.value is None else f"{h.name}={h.value}"
                                                       for h in self.header_matches) + "]")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class KafkaRule:
    """One entry of `rules.kafka`; "" / None = any."""

    role: str = ""  # "produce" | "consume" (lower-cased)
    api_key: str = ""  # a name of KAFKA_API_KEYS (lower-cased)
    api_version: int | None = None
    client_id: str = ""
    topic: str = ""

    @property
    def api_keys(self) -> frozenset[int] | None:
        """The API keys this entry allows; None = every key."""
        if self.role:
            return ROLES.get(self.role, frozenset())
        if self.api_key:
            key = KAFKA_API_KEYS.get(self.api_key)
            return frozenset() if key is None else frozenset({key})
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (("role", self.role), ("apiKey", self.api_key)) if v}
        if self.api_version is not None:
            out["apiVersion"] = str(self.api_version)
        out.update({k: v for k, v in (("clientID", self.client_id), ("topic", self.topic)) if v})
        return out

    def describe(self) -> str:
        return "{" + ", ".join(f"{k} {v}" for k, v in self.to_json().items()) + "}"


@dataclass(frozen=True)
class L7Rules:
    """The `rules` of one toPorts entry: HTTP or Kafka, never both."""

    kind: str  # "http" | "kafka"
    http: tuple[HttpRule, ...] = ()
    kafka: tuple[KafkaRule, ...] = ()

    def __str__(self) -> str:
        return self.kind

    @property
    def entries(self) -> tuple[HttpRule, ...] | tuple[KafkaRule, ...]:
        return self.http if self.kind == HTTP else self.kafka

    def to_json(self) -> dict[str, Any]:
        """The `rules` object in the policy language."""
        return {self.kind: [e.to_json() for e in self.entries]}


# -- parsing -----------------------------------------------------------------------------------


def _fields(raw: Any, allowed: Sequence[str], where: str, not_yet: Mapping[str, str] | None = None,
            what: str = "an object") -> dict[str, tuple[str, Any]]:
    """{canonical field: (key as written, value)} of an object whose keys are matched
    case-insensitively (as Go's encoding/json, which Cilium decodes with). Unknown keys are
    refused by name; null values count as left out (as in Go)."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: must be {what}")
    canon = {a.lower(): a for a in allowed}
    out: dict[str, tuple[str, Any]] = {}
    for key, value in raw.items():
        low = key.lower() if isinstance(key, str) else ""
        if not_yet and low in not_yet:
            if value is None:
                continue
            raise InvalidRequest(f"{where}.{key}: {not_yet[low]} are not supported yet")
        if low not in canon:
            hint = difflib.get_close_matches(low, list(canon), n=1, cutoff=0.6)
            raise InvalidRequest(f"{where}: unknown field {key!r}"
                                 + (f" (did you mean {canon[hint[0]]!r}?)" if hint else ""))
        name = canon[low]
        if name in out:
            raise InvalidRequest(f"{where}: {name} is given twice ({out[name][0]!r} and {key!r})")
        if value is not None:
            out[name] = (key, value)
    return out


def _string(fields: Mapping[str, tuple[str, Any]], name: str, where: str) -> str:
    if name not in fields:
        return ""
    key, value = fields[name]
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key}: must be a string")
    return value


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    """A pattern compiled once per process (patterns are checked by _pattern when parsed)."""
    return re.compile(pattern)


def _pattern(value: str, where: str) -> str:
    if len(value) > MAX_PATTERN:
        raise InvalidRequest(f"{where}: the pattern is longer than {MAX_PATTERN} characters")
    try:
        _regex(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidRequest(f"{where}: {value!r} is not a regular expression: {exc}") from None
    return value


def _header_name(name: str, where: str) -> str:
    if not name:
        raise InvalidRequest(f"{where}: the header name is missing")
    if not _TOKEN.fullmatch(name):
        raise InvalidRequest(f"{where}: {name!r} is not a header name (write 'Name' or 'Name: value')")
    return name


def _list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: must be a list of {what}")
    return value


def parse_http_rule(raw: Any, where: str) -> HttpRule:
    """One entry of `rules.http` (Cilium's PortRuleHTTP)."""
    f = _fields(raw, ("method", "path", "host", "headers", "headerMatches"), where,
                what="an object (method, path, host, headers, headerMatches)")
    values = {}
    for name in ("method", "path", "host"):
        value = _string(f, name, where)
        values[name] = _pattern(value, f"{where}.{f[name][0]}") if value else ""
    headers: list[HeaderMatch] = []
    if "headers" in f:
        key, raw_headers = f["headers"]
        for i, item in enumerate(_list(raw_headers, f"{where}.{key}", "strings ('Name' or 'Name: value')")):
            w = f"{where}.{key}[{i}]"
            if not isinstance(item, str):
                raise InvalidRequest(f"{w}: must be a string ('Name' or 'Name: value')")
            name, _, value = item.partition(":")
            name, value = name.strip(), value.strip()
            headers.append(HeaderMatch(_header_name(name, w), _pattern(value, w) if value else None))
    matches: list[HeaderMatch] = []
    if "headerMatches" in f:
        key, raw_matches = f["headerMatches"]
        for i, item in enumerate(_list(raw_matches, f"{where}.{key}", "objects {name, value}")):
            w = f"{where}.{key}[{i}]"
            m = _fields(item, ("name", "value", "mismatch", "secret"), w, what="an object {name, value}")
            if "mismatch" in m and m["mismatch"][1] != "":
                action = m["mismatch"][1]
                known = f" ({', '.join(_MISMATCH_ACTIONS)})" if action not in _MISMATCH_ACTIONS else ""
                raise InvalidRequest(f"{w}.{m['mismatch'][0]}: headerMatches mismatch actions{known} "
                                     "are not supported yet")
            if "secret" in m:
                raise InvalidRequest(f"{w}.{m['secret'][0]}: headerMatches secrets are not supported yet")
            if "name" not in m:
                raise InvalidRequest(f"{w}: name is required")
            name = _header_name(_string(m, "name", w), f"{w}.{m['name'][0]}")
            value = _string(m, "value", w)
            matches.append(HeaderMatch(name, value if value else None))
    return HttpRule(values["method"], values["path"], values["host"], tuple(headers), tuple(matches))


def parse_kafka_rule(raw: Any, where: str) -> KafkaRule:
    """One entry of `rules.kafka` (Cilium's PortRuleKafka and its Sanitize)."""
    f = _fields(raw, ("role", "apiKey", "apiVersion", "clientID", "topic"), where,
                what="an object (role, apiKey, apiVersion, clientID, topic)")
    role, api_key = _string(f, "role", where).lower(), _string(f, "apiKey", where).lower()
    if role and api_key:
        raise InvalidRequest(f"{where}: cannot set both role and apiKey (as Cilium): a role is a set of API keys")
    if role and role not in ROLES:
        raise InvalidRequest(f"{where}.{f['role'][0]}: invalid Kafka role {f['role'][1]!r} (produce or consume)")
    if api_key and api_key not in KAFKA_API_KEYS:
        hint = difflib.get_close_matches(api_key, list(KAFKA_API_KEYS), n=1)
        raise InvalidRequest(f"{where}.{f['apiKey'][0]}: unknown Kafka API key {f['apiKey'][1]!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; known: {', '.join(KAFKA_API_KEYS)}")
    version: int | None = None
    if "apiVersion" in f:
        key, value = f["apiVersion"]
        if isinstance(value, int) and not isinstance(value, bool):
            version = value
        elif isinstance(value, str) and (value == "" or (value.isascii() and value.isdigit())):
            version = int(value) if value else None
        else:
            raise InvalidRequest(f"{where}.{key}: invalid Kafka apiVersion {value!r} (a decimal number)")
        if version is not None and not 0 <= version <= MAX_API_VERSION:
            raise InvalidRequest(f"{where}.{key}: invalid Kafka apiVersion {value!r} (0 to {MAX_API_VERSION})")
    topic = _string(f, "topic", where)
    if len(topic) > MAX_TOPIC:
        raise InvalidRequest(f"{where}.{f['topic'][0]}: the Kafka topic is longer than {MAX_TOPIC} characters")
    if topic and not _TOPIC.fullmatch(topic):
        raise InvalidRequest(f"{where}.{f['topic'][0]}: invalid Kafka topic name {topic!r} "
                             "(letters, digits, '.', '_' and '-' only)")
    return KafkaRule(role, api_key, version, _string(f, "clientID", where), topic)


_EMPTY = ("leave rules out for an L4-only rule, or write {kind}: [{{}}] to allow every request through the "
          "proxy")


def parse_l7_rules(raw: Any, where: str) -> L7Rules:
    """The `rules` object of a toPorts entry: `http` or `kafka`, never both, never empty."""
    f = _fields(raw, (HTTP, KAFKA), where, not_yet={"dns": "DNS rules (rules.dns)",
                                                      "l7proto": "generic L7 rules (l7proto, l7)",
                                                      "l7": "generic L7 rules (l7proto, l7)"},
                what="an object with http or kafka")
    if not f:
        raise InvalidRequest(f"{where}: holds no L7 rules; " + _EMPTY.format(kind="http"))
    if len(f) > 1:
        raise InvalidRequest(f"{where}: holds both http and kafka rules; one rules object takes one L7 "
                             "protocol (as Cilium)")
    [(kind, (key, value))] = f.items()
    items = _list(value, f"{where}.{key}", f"{kind.upper() if kind == HTTP else 'Kafka'} rules (objects)")
    if not items:
        raise InvalidRequest(f"{where}.{key}: an empty list (Cilium reads it as no L7 rules: every request "
                             "passes); " + _EMPTY.format(kind=kind))
    if kind == HTTP:
        return L7Rules(HTTP, http=tuple(parse_http_rule(e, f"{where}.{key}[{i}]") for i, e in enumerate(items)))
    return L7Rules(KAFKA, kafka=tuple(parse_kafka_rule(e, f"{where}.{key}[{i}]") for i, e in enumerate(items)))


# -- grants and filters -------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """The L7 rules one policy rule contributes to an entry."""

    rule: int
    name: str  # the rule's name (labels or `rule N`)
    http: tuple[HttpRule, ...] = ()
    kafka: tuple[KafkaRule, ...] = ()

    @property
    def kind(self) -> str:
        """"http" or "kafka" by the entries it holds ("" if none)."""
        return HTTP if self.http else KAFKA if self.kafka else ""

    @property
    def label(self) -> str:
        """`rule 3 (app=web)`, or `rule 3` when the rule has no labels."""
        plain = f"rule {self.rule}"
        return plain if not self.name or self.name == plain else f"{plain} ({self.name})"


def grant_of(rule: int, name: str, rules: L7Rules) -> Grant:
    """What a policy rule (its id and name) contributes through one toPorts entry's `rules`."""
    return Grant(rule, name, http=rules.http, kafka=rules.kafka)


class _HttpCheck:
    """One HTTP entry of one grant, its regular expressions compiled."""

    __slots__ = ("error", "exact", "headers", "host", "label", "method", "path", "rule")

    def __init__(self, rule: int, label: str, entry: HttpRule | None) -> None:
        self.rule, self.label, self.error = rule, label, ""
        self.method: re.Pattern[str] | None = None
        self.path: re.Pattern[str] | None = None
        self.host: re.Pattern[str] | None = None
        self.headers: tuple[tuple[str, str, re.Pattern[str] | None], ...] = ()
        self.exact: tuple[tuple[str, str, str | None], ...] = ()
        if entry is None:
            self.error = "has no http rules"
            return
        try:
            self.method, self.path, self.host = (_regex(p) if p else None
                                                 for p in (entry.method, entry.path, entry.host))
            self.headers = tuple((h.name, h.name.lower(), None if h.value is None else _regex(h.value))
                                 for h in entry.headers)
        except (re.error, RecursionError, OverflowError) as exc:  # not from the parser: fail closed
            self.error = f"has an invalid pattern ({exc}): matches nothing"
        self.exact = tuple((h.name, h.name.lower(), h.value) for h in entry.header_matches)

    def why_not(self, req: HttpRequest, headers: Mapping[str, list[str]]) -> str | None:
        """None if the request matches, else why not."""
        if self.error:
            return self.error
        if self.method is not None and self.method.fullmatch(req.method) is None:
            return f"method {_q(req.method)} does not match"
        if self.path is not None and self.path.fullmatch(req.path) is None:
            return f"path {_q(req.path)} does not match"
        if self.host is not None and self.host.fullmatch(req.host) is None:
            return f"host {_q(req.host)} does not match"
        for name, low, rx in self.headers:
            values = headers.get(low)
            if not values:
                return f"header {name} is missing"
            if rx is not None and not any(rx.fullmatch(v) for v in values):
                return f"header {name} {_q(values[0])} does not match"
        for name, low, value in self.exact:
            values = headers.get(low)
            if not values:
                return f"header {name} is missing"
            if value is not None and value not in values:
                return f"header {name} {_q(values[0])} is not {_q(value)}"
        return None


class _KafkaCheck:
    """One Kafka entry of one grant."""

    __slots__ = ("client_id", "error", "keys", "keys_text", "label", "rule", "topic", "version")

    def __init__(self, rule: int, label: str, entry: KafkaRule | None) -> None:
        self.rule, self.label, self.error = rule, label, "" if entry is not None else "has no kafka rules"
        entry = entry or KafkaRule()
        self.keys = entry.api_keys
        key = KAFKA_API_KEYS.get(entry.api_key, -1)
        self.keys_text = f"in role {entry.role}" if entry.role else kafka_key_name(key)
        self.version, self.client_id, self.topic = entry.api_version, entry.client_id, entry.topic

    def why_not(self, req: KafkaRequest) -> str | None:
        """None if the request's header (key, version, client id) matches, else why not."""
        if self.error:
            return self.error
        if self.keys is not None and req.api_key not in self.keys:
            return f"api key {kafka_key_name(req.api_key)} is not {self.keys_text}"
        if self.version is not None and req.api_version != self.version:
            return f"api version {req.api_version} is not {self.version}"
        if self.client_id and req.client_id != self.client_id:
            return f"client id {_q(req.client_id)} is not {_q(self.client_id)}"
        return None


def kafka_key_name(key: int) -> str:
    """`fetch (1)`; `key 99` for a key without a name."""
    name = KAFKA_KEY_NAMES.get(key)
    return f"{name} ({key})" if name else f"key {key}"


_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _q(text: str | None) -> str:
    """A request value quoted for a trace line (cut at 200 characters)."""
    if text is None:
        return "(none)"
    if len(text) > 200:
        text = text[:200] + "..."
    return '"' + text.translate(_ESCAPES) + '"'


def _header_map(headers: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


_GRANT_KEYS = ("rule", "name", HTTP, KAFKA)


@dataclass(frozen=True)
class L7Filter:
    """The L7 rules in force for one policy entry: a request passes if any grant allows it."""

    kind: str  # "http" or "kafka"
    grants: tuple[Grant, ...]

    @classmethod
    def of(cls, grants: Iterable[Grant], kind: str = "") -> L7Filter:
        """A filter of `grants`: equal grants once, ordered by rule id (stably). The kind is the
        grants' (`kind` is needed only when none holds an entry); mixed kinds are refused."""
        unique = sorted(dict.fromkeys(grants), key=lambda g: g.rule)
        kinds = dict.fromkeys(([kind] if kind else []) + [g.kind for g in unique if g.kind])
        if len(kinds) > 1:
            http = next((g.label for g in unique if g.kind == HTTP), "")
            kafka = next((g.label for g in unique if g.kind == KAFKA), "")
            what = (f"{http} puts http rules and {kafka} kafka rules on one port" if http and kafka else
                    f"{http or kafka} puts {HTTP if http else KAFKA} rules on a {kind} port")
            raise InvalidRequest(f"{what}: one port takes one L7 protocol (as Cilium)")
        if not kinds:
            raise ValueError("the kind of a filter without L7 rules must be given")
        return cls(next(iter(kinds)), tuple(unique))

    # -- verdicts

    @functools.cached_property
    def _http_plan(self) -> tuple[tuple[_HttpCheck, ...], bool]:
        checks: list[_HttpCheck] = []
        for g in self.grants:
            label = g.label
            if not g.http:
                checks.append(_HttpCheck(g.rule, label, None))
            checks.extend(_HttpCheck(g.rule, f"{label} http[{i}] {e.describe()}", e) for i, e in enumerate(g.http))
        return tuple(checks), any(c.headers or c.exact for c in checks)

    @functools.cached_property
    def _kafka_plan(self) -> tuple[_KafkaCheck, ...]:
        checks: list[_KafkaCheck] = []
        for g in self.grants:
            label = g.label
            if not g.kafka:
                checks.append(_KafkaCheck(g.rule, label, None))
            checks.extend(_KafkaCheck(g.rule, f"{label} kafka[{i}] {e.describe()}", e)
                          for i, e in enumerate(g.kafka))
        return tuple(checks)

    def _wrong_kind(self, asked: str) -> L7Verdict:
        return L7Verdict(False, 0, (f"the L7 rules here are {self.kind} rules, not {asked}: the request is denied",))

    def http_verdict(self, req: HttpRequest) -> L7Verdict:
        if self.kind != HTTP:
            return self._wrong_kind(HTTP)
        checks, need_headers = self._http_plan
        headers = _header_map(req.headers) if need_headers else {}
        steps = []
        for check in checks:
            why = check.why_not(req, headers)
            if why is None:
                steps.append(f"{check.label}: allows")
                return L7Verdict(True, check.rule, tuple(steps))
            steps.append(f"{check.label}: {why}")
        steps.append(_DENIED)
        return L7Verdict(False, 0, tuple(steps))

    def kafka_verdict(self, req: KafkaRequest) -> L7Verdict:
        """Cilium's MatchesRule: an entry without a topic (or a request without topics) allows the
        request if its key, version and client id match; an entry with a topic allows that
        topic; the request passes once every topic it names is allowed. `rule` is then the
        lowest rule id that allowed a topic of it."""
        if self.kind != KAFKA:
            return self._wrong_kind(KAFKA)
        remaining = dict.fromkeys(req.topics)
        topics = len(remaining)
        first = 0
        steps = []
        for check in self._kafka_plan:
            why = check.why_not(req)
            if why is None and check.topic and topics:
                if check.topic not in remaining:
                    why = (f"topic {check.topic} is already allowed" if check.topic in req.topics
                           else f"topic {check.topic} is not in the request")
                else:
                    del remaining[check.topic]
                    first = first or check.rule
                    if remaining:
                        steps.append(f"{check.label}: allows topic {check.topic}; still to allow: "
                                     + ", ".join(remaining))
                        continue
                    steps.append(f"{check.label}: allows topic {check.topic}; every topic of the request is allowed")
                    return L7Verdict(True, first, tuple(steps))
            if why is None:
                steps.append(f"{check.label}: allows {kafka_key_name(req.api_key)}")
                return L7Verdict(True, check.rule, tuple(steps))
            steps.append(f"{check.label}: {why}")
        if remaining and len(remaining) < topics:
            steps.append(f"{_DENIED}: no entry allows topic {', '.join(remaining)} (every topic of a request "
                         "must be allowed)")
        else:
            steps.append(_DENIED)
        return L7Verdict(False, 0, tuple(steps))

    def describe(self) -> tuple[str, ...]:
        """One line per entry: `rule 3 (app=web) http[0] {method GET}`."""
        return tuple(c.label for c in (self._http_plan[0] if self.kind == HTTP else self._kafka_plan))

    # -- the file the proxy reads

    def to_json(self) -> dict[str, Any]:
        grants = []
        for g in self.grants:
            item: dict[str, Any] = {"rule": g.rule, "name": g.name}
            if g.http:
                item[HTTP] = [e.to_json() for e in g.http]
            if g.kafka:
                item[KAFKA] = [e.to_json() for e in g.kafka]
            grants.append(item)
        return {"kind": self.kind, "grants": grants}

    @classmethod
    def from_json(cls, data: Any) -> L7Filter:
        """The filter to_json wrote, checked as strictly as policy rules (another process wrote it)."""
        where = "L7 filter"
        if not isinstance(data, dict):
            raise InvalidRequest(f"{where}: must be an object with kind and grants")
        for key in data:
            if key not in ("kind", "grants"):
                raise InvalidRequest(f"{where}: unknown field {key!r}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise InvalidRequest(f"{where}.kind: must be http or kafka")
        raw_grants = data.get("grants")
        if not isinstance(raw_grants, list):
            raise InvalidRequest(f"{where}.grants: must be a list")
        grants = []
        for i, raw in enumerate(raw_grants):
            w = f"{where}.grants[{i}]"
            if not isinstance(raw, dict):
                raise InvalidRequest(f"{w}: must be an object")
            for key in raw:
                if key not in _GRANT_KEYS:
                    raise InvalidRequest(f"{w}: unknown field {key!r}")
            rule, name = raw.get("rule"), raw.get("name")
            if isinstance(rule, bool) or not isinstance(rule, int) or rule < 0:
                raise InvalidRequest(f"{w}.rule: must be a rule id (a number)")
            if not isinstance(name, str):
                raise InvalidRequest(f"{w}.name: must be a string")
            http = tuple(parse_http_rule(e, f"{w}.http[{j}]")
                         for j, e in enumerate(_list(raw.get(HTTP, []), f"{w}.http", "HTTP rules")))
            kafka = tuple(parse_kafka_rule(e, f"{w}.kafka[{j}]")
                          for j, e in enumerate(_list(raw.get(KAFKA, []), f"{w}.kafka", "Kafka rules")))
            grants.append(Grant(rule, name, http, kafka))
        return cls(kind, tuple(grants))


def merge(filters: Iterable[L7Filter]) -> L7Filter:
    """One filter of several (the rules of several allows of one entry): their grants, equal
    ones once, ordered by rule id. Filters of different kinds are refused (InvalidRequest)."""
    filters = list(filters)
    if not filters:
        raise ValueError("merge needs at least one filter")
    kinds = {f.kind for f in filters}
    if len(kinds) > 1:
        raise InvalidRequest("http and kafka rules on one port: one port takes one L7 protocol (as Cilium)")
    return L7Filter.of((g for f in filters for g in f.grants), filters[0].kind)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(target: str) -> str:
    """A request target's path as the proxy decides and forwards it (Cilium's Envoy with
    --http-normalize-path): percent-encoded unreserved characters decoded, `.` and `..` segments
    removed (RFC 3986 5.2.4) and repeated slashes merged; the query is kept as sent. So
    `/public/../private` is decided as `/private`, which is what the server would serve."""
    if not target.startswith("/"):
        return target  # `*` (OPTIONS) or an absolute form: left as sent
    path, sep, query = target.partition("?")
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            code = part[:2]
            try:
                ch = chr(int(code, 16)) if len(code) == 2 else ""
            except ValueError:
                ch = ""
            out.append(ch + part[2:] if ch in _UNRESERVED and ch else "%" + part)
        path = "".join(out)
    segments: list[str] = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if segments:
                segments.pop()
        elif seg not in (".", ""):
            segments.append(seg)
    trailing = path.endswith(("/", "/.", "/..")) and bool(segments)
    normal = "/" + "/".join(segments) + ("/" if trailing else "")
    return normal + sep + query
