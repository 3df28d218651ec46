"""datapath.policy.l7: parsing `toPorts[].rules` (http, kafka) and the refusals, matching HTTP and
Kafka requests (tables), the trace steps, the JSON the proxy reads, and merging filters."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import pytest

from datapath.errors import InvalidRequest
from datapath.policy import PortRange, parse_rule, parse_rules
from datapath.policy.l7 import (
    CILIUM_ROLES,
    KAFKA_API_KEYS,
    MAX_PATTERN,
    ROLES,
    Grant,
    HeaderMatch,
    HttpRequest,
    HttpRule,
    KafkaRequest,
    KafkaRule,
    L7Filter,
    L7Rules,
    grant_of,
    kafka_key_name,
    merge,
    parse_http_rule,
    parse_kafka_rule,
    parse_l7_rules,
)

TCP = 6
SEL = {"matchLabels": {"app": "web"}}


def with_rules(rules: Any, ports: list[dict[str, Any]] | None = None, section: str = "ingress") -> dict[str, Any]:
    ports = [{"port": "80", "protocol": "TCP"}] if ports is None else ports
    return {"endpointSelector": SEL, section: [{"toPorts": [{"ports": ports, "rules": rules}]}]}


def l7_of(rules: Any) -> L7Rules:
    [r] = parse_rules([with_rules(rules)])
    [pr] = r.ingress[0].ports
    assert pr.l7 is not None
    return pr.l7


def http_filter(*entries: dict[str, Any], rule: int = 3, name: str = "app=web") -> L7Filter:
    return L7Filter.of([grant_of(rule, name, l7_of({"http": list(entries)}))])


def kafka_filter(*entries: dict[str, Any], rule: int = 3, name: str = "app=kafka") -> L7Filter:
    return L7Filter.of([grant_of(rule, name, l7_of({"kafka": list(entries)}))])


def get(path: str = "/", method: str = "GET", host: str = "app", **headers: str) -> HttpRequest:
    return HttpRequest(method, path, host, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


# -- parsing: what valid rules become -----------------------------------------------------------


def test_http_rule_every_field() -> None:
    l7 = l7_of({"http": [{"method": "GET|HEAD", "path": "/public/.*", "host": "app(:80)?",
                          "headers": ["X-Present", "X-Token: [0-9]+", "X-Colon:"],
                          "headerMatches": [{"name": "X-Env", "value": "prod"}, {"name": "X-Flag"},
                                            {"name": "X-Empty", "value": ""}, {"name": "X-M", "mismatch": ""}]}]})
    assert l7 == L7Rules("http", http=(HttpRule(
        method="GET|HEAD", path="/public/.*", host="app(:80)?",
        headers=(HeaderMatch("X-Present"), HeaderMatch("X-Token", "[0-9]+"), HeaderMatch("X-Colon")),
        header_matches=(HeaderMatch("X-Env", "prod"), HeaderMatch("X-Flag"), HeaderMatch("X-Empty"),
                        HeaderMatch("X-M"))),))
    assert str(l7) == "http" and l7.kafka == ()


def test_keys_are_case_insensitive_as_in_old_examples() -> None:
    l7 = l7_of({"HTTP": [{"Method": "GET", "PATH": "/x", "Headers": ["A"],
                          "headermatches": [{"Name": "B", "VALUE": "c"}]}]})
    assert l7.http == (HttpRule("GET", "/x", headers=(HeaderMatch("A"),), header_matches=(HeaderMatch("B", "c"),)),)
    kafka = l7_of({"Kafka": [{"Role": "Produce", "Topic": "t"}, {"APIKEY": "MetaData", "apiversion": "3",
                                                                "ClientId": "c1"}]})
    assert kafka.kind == "kafka" and kafka.kafka == (KafkaRule(role="produce", topic="t"),
                                                      KafkaRule(api_key="metadata", api_version=3, client_id="c1"))


def test_null_values_are_left_out_as_in_go() -> None:
    assert l7_of({"http": [{"method": None, "path": "/x"}], "kafka": None}).http == (HttpRule(path="/x"),)


@pytest.mark.parametrize(("raw", "rule"), [
    ({}, KafkaRule()),
    ({"role": "consume"}, KafkaRule(role="consume")),
    ({"apiKey": "apiversions"}, KafkaRule(api_key="apiversions")),
    ({"apiVersion": "7"}, KafkaRule(api_version=7)),
    ({"apiVersion": 7}, KafkaRule(api_version=7)),  # YAML number
    ({"apiVersion": ""}, KafkaRule()),  # empty: any version
    ({"apiVersion": "32767"}, KafkaRule(api_version=32767)),
    ({"clientID": "my-app"}, KafkaRule(client_id="my-app")),
    ({"topic": "empire-announce"}, KafkaRule(topic="empire-announce")),
    ({"topic": "a.B_9-z"}, KafkaRule(topic="a.B_9-z")),
    ({"topic": "t" * 255}, KafkaRule(topic="t" * 255)),
])
def test_kafka_rule_fields(raw: dict[str, Any], rule: KafkaRule) -> None:
    assert parse_kafka_rule(raw, "k") == rule


def test_rules_go_to_every_port_of_the_entry_only() -> None:
    [r] = parse_rules([{"endpointSelector": SEL, "ingress": [{"toPorts": [
        {"ports": [{"port": "80", "protocol": "TCP"}, {"port": "8000", "endPort": 8080, "protocol": "tcp"}],
         "rules": {"http": [{"method": "GET"}]}},
        {"ports": [{"port": "53", "protocol": "UDP"}]},
    ]}]}])
    l7 = L7Rules("http", http=(HttpRule(method="GET"),))
    assert r.ingress[0].ports == (PortRange(TCP, 80, 80, l7), PortRange(TCP, 8000, 8080, l7), PortRange(17, 53, 53))
    assert [str(p) for p in r.ingress[0].ports] == ["80/TCP+http", "8000-8080/TCP+http", "53/UDP"]


def test_egress_takes_l7_rules_too() -> None:
    [r] = parse_rules([with_rules({"kafka": [{"role": "produce"}]}, section="egress")])
    assert r.egress[0].ports[0].l7 == L7Rules("kafka", kafka=(KafkaRule(role="produce"),))
    assert str(r.egress[0].ports[0]) == "80/TCP+kafka"


def test_port_ranges_with_rules_stay_hashable_cache_keys() -> None:
    [r] = parse_rules([with_rules({"http": [{"headers": ["A: b"], "headerMatches": [{"name": "c"}]}]})])
    ports = r.ingress[0].ports

    @functools.lru_cache(maxsize=4)
    def count(p: tuple[PortRange, ...]) -> int:
        return len(p)

    assert count(ports) == count(tuple(parse_rules([with_rules({"http": [{"headers": ["A: b"], "headerMatches": [
        {"name": "c"}]}]})])[0].ingress[0].ports)) == 1
    assert count.cache_info().hits == 1


def test_l4_rules_are_unchanged() -> None:
    [r] = parse_rules([{"endpointSelector": SEL, "ingress": [{"toPorts": [{"ports": [{"port": "80"}]}]}]}])
    assert all(p.l7 is None for p in r.ingress[0].ports) and len(r.ingress[0].ports) == 3  # ANY: TCP, UDP, SCTP


def test_rules_to_json_reads_back() -> None:
    raw = {"http": [{"method": "GET", "path": "/a", "host": "h", "headers": ["A", "B: c+"],
                     "headerMatches": [{"name": "D"}, {"name": "E", "value": "f"}]}, {}]}
    l7 = parse_l7_rules(raw, "r")
    assert l7.to_json() == raw and parse_l7_rules(l7.to_json(), "r") == l7
    kafka = {"kafka": [{"role": "produce", "apiVersion": "3", "clientID": "c", "topic": "t"}, {"apiKey": "fetch"}]}
    assert parse_l7_rules(kafka, "r").to_json() == kafka


# -- parsing: refusals ----------------------------------------------------------------------------

P = "rule 0: ingress[0].toPorts[0]"
REFUSALS: list[tuple[Any, str]] = [
    # the rules object
    ({}, f"{P}.rules: holds no L7 rules; leave rules out for an L4-only rule, or write http: [{{}}] to allow "
         "every request through the proxy"),
    ({"http": []}, f"{P}.rules.http: an empty list (Cilium reads it as no L7 rules: every request passes); leave "
                   "rules out for an L4-only rule, or write http: [{}]"),
    ({"kafka": []}, f"{P}.rules.kafka: an empty list"),
    ({"http": None}, f"{P}.rules: holds no L7 rules"),
    ([], f"{P}.rules: must be an object with http or kafka"),
    ("http", f"{P}.rules: must be an object with http or kafka"),
    ({"http": [{}], "kafka": [{}]}, f"{P}.rules: holds both http and kafka rules; one rules object takes one L7 "
                                    "protocol"),
    ({"http": [{}], "HTTP": [{}]}, f"{P}.rules: http is given twice ('http' and 'HTTP')"),
    ({"dns": [{"matchPattern": "*"}]}, f"{P}.rules.dns: DNS rules (rules.dns) are not supported yet"),
    ({"DNS": [{}]}, f"{P}.rules.DNS: DNS rules (rules.dns) are not supported yet"),
    ({"l7proto": "r2d2", "l7": [{}]}, f"{P}.rules.l7proto: generic L7 rules (l7proto, l7) are not supported yet"),
    ({"l7": [{}]}, f"{P}.rules.l7: generic L7 rules (l7proto, l7) are not supported yet"),
    ({"grpc": [{}]}, f"{P}.rules: unknown field 'grpc'"),
    ({"htp": [{}]}, f"{P}.rules: unknown field 'htp' (did you mean 'http'?)"),
    ({"http": {"method": "GET"}}, f"{P}.rules.http: must be a list of HTTP rules"),
    # http entries
    ({"http": ["GET"]}, f"{P}.rules.http[0]: must be an object (method, path, host, headers, headerMatches)"),
    ({"http": [{"methods": "GET"}]}, f"{P}.rules.http[0]: unknown field 'methods' (did you mean 'method'?)"),
    ({"http": [{"method": "GET", "Method": "PUT"}]}, f"{P}.rules.http[0]: method is given twice"),
    ({"http": [{"method": 1}]}, f"{P}.rules.http[0].method: must be a string"),
    ({"http": [{"path": ["/a"]}]}, f"{P}.rules.http[0].path: must be a string"),
    ({"http": [{"path": "/a("}]}, f"{P}.rules.http[0].path: '/a(' is not a regular expression: missing ), "
                                  "unterminated subpattern at position 2"),
    ({"http": [{"Host": "*.example.com"}]}, f"{P}.rules.http[0].Host: '*.example.com' is not a regular "
                                            "expression: nothing to repeat"),
    ({"http": [{"method": "[A-Z"}]}, f"{P}.rules.http[0].method: '[A-Z' is not a regular expression"),
    ({"http": [{"path": "/" + "a" * MAX_PATTERN}]}, f"{P}.rules.http[0].path: the pattern is longer than 1024"),
    ({"http": [{"headers": "X-A"}]}, f"{P}.rules.http[0].headers: must be a list of strings"),
    ({"http": [{"headers": [{"name": "X-A"}]}]}, f"{P}.rules.http[0].headers[0]: must be a string"),
    ({"http": [{"headers": [""]}]}, f"{P}.rules.http[0].headers[0]: the header name is missing"),
    ({"http": [{"headers": [": v"]}]}, f"{P}.rules.http[0].headers[0]: the header name is missing"),
    ({"http": [{"headers": ["X-A true"]}]}, f"{P}.rules.http[0].headers[0]: 'X-A true' is not a header name "
                                            "(write 'Name' or 'Name: value')"),
    ({"http": [{"headers": ["X-A: (x"]}]}, f"{P}.rules.http[0].headers[0]: '(x' is not a regular expression"),
    ({"http": [{"headers": ["X-A: " + "x" * (MAX_PATTERN + 1)]}]}, f"{P}.rules.http[0].headers[0]: the pattern "
                                                                    "is longer"),
    ({"http": [{"headerMatches": {"name": "a"}}]}, f"{P}.rules.http[0].headerMatches: must be a list of objects"),
    ({"http": [{"headerMatches": ["a"]}]}, f"{P}.rules.http[0].headerMatches[0]: must be an object {{name, value}}"),
    ({"http": [{"headerMatches": [{"value": "a"}]}]}, f"{P}.rules.http[0].headerMatches[0]: name is required"),
    ({"http": [{"headerMatches": [{"name": ""}]}]}, f"{P}.rules.http[0].headerMatches[0].name: the header name is "
                                                    "missing"),
    ({"http": [{"headerMatches": [{"name": 3}]}]}, f"{P}.rules.http[0].headerMatches[0].name: must be a string"),
    ({"http": [{"headerMatches": [{"name": "a", "value": 1}]}]}, f"{P}.rules.http[0].headerMatches[0].value: must "
                                                                 "be a string"),
    ({"http": [{"headerMatches": [{"name": "a", "mismatch": "LOG"}]}]},
     f"{P}.rules.http[0].headerMatches[0].mismatch: headerMatches mismatch actions are not supported yet"),
    ({"http": [{"headerMatches": [{"name": "a", "mismatch": "REPLACE", "value": "b"}]}]},
     "headerMatches mismatch actions are not supported yet"),
    ({"http": [{"headerMatches": [{"name": "a", "mismatch": "DROP"}]}]},
     f"{P}.rules.http[0].headerMatches[0].mismatch: headerMatches mismatch actions (LOG, ADD, DELETE, REPLACE) are "
     "not supported yet"),
    ({"http": [{"headerMatches": [{"name": "a", "secret": {"name": "s", "namespace": "n"}}]}]},
     f"{P}.rules.http[0].headerMatches[0].secret: headerMatches secrets are not supported yet"),
    ({"http": [{"headerMatches": [{"name": "a", "regex": "b"}]}]}, f"{P}.rules.http[0].headerMatches[0]: unknown "
                                                                   "field 'regex'"),
    # kafka entries
    ({"kafka": ["produce"]}, f"{P}.rules.kafka[0]: must be an object (role, apiKey, apiVersion, clientID, topic)"),
    ({"kafka": [{"role": "produce", "apiKey": "metadata"}]}, f"{P}.rules.kafka[0]: cannot set both role and apiKey"),
    ({"kafka": [{"role": "admin"}]}, f"{P}.rules.kafka[0].role: invalid Kafka role 'admin' (produce or consume)"),
    ({"kafka": [{"role": 1}]}, f"{P}.rules.kafka[0].role: must be a string"),
    ({"kafka": [{"apiKey": "createtopic"}]}, f"{P}.rules.kafka[0].apiKey: unknown Kafka API key 'createtopic' (did "
                                             "you mean 'createtopics'?); known: produce, fetch, offsets"),
    ({"kafka": [{"apiKey": "gettelemetrysubscriptions"}]}, "unknown Kafka API key 'gettelemetrysubscriptions'"),
    ({"kafka": [{"apiKey": 0}]}, f"{P}.rules.kafka[0].apiKey: must be a string"),
    ({"kafka": [{"apiVersion": "x"}]}, f"{P}.rules.kafka[0].apiVersion: invalid Kafka apiVersion 'x' (a decimal "
                                       "number)"),
    ({"kafka": [{"apiVersion": "-1"}]}, "invalid Kafka apiVersion '-1'"),
    ({"kafka": [{"apiVersion": " 3"}]}, "invalid Kafka apiVersion ' 3'"),
    ({"kafka": [{"apiVersion": "²"}]}, "invalid Kafka apiVersion '²'"),
    ({"kafka": [{"apiVersion": "32768"}]}, "invalid Kafka apiVersion '32768' (0 to 32767)"),
    ({"kafka": [{"apiVersion": -1}]}, "invalid Kafka apiVersion -1 (0 to 32767)"),
    ({"kafka": [{"apiVersion": True}]}, "invalid Kafka apiVersion True"),
    ({"kafka": [{"apiVersion": 1.5}]}, "invalid Kafka apiVersion 1.5"),
    ({"kafka": [{"clientID": 7}]}, f"{P}.rules.kafka[0].clientID: must be a string"),
    ({"kafka": [{"topic": "t" * 256}]}, f"{P}.rules.kafka[0].topic: the Kafka topic is longer than 255 characters"),
    ({"kafka": [{"topic": "a b"}]}, f"{P}.rules.kafka[0].topic: invalid Kafka topic name 'a b' (letters, digits, "
                                    "'.', '_' and '-' only)"),
    ({"kafka": [{"topic": "a/b"}]}, "invalid Kafka topic name 'a/b'"),
    ({"kafka": [{"topic": "a\\b"}]}, "invalid Kafka topic name"),  # Cilium's own regex lets a backslash through
    ({"kafka": [{"topic": "tópico"}]}, "invalid Kafka topic name"),
    ({"kafka": [{"topics": ["a"]}]}, f"{P}.rules.kafka[0]: unknown field 'topics' (did you mean 'topic'?)"),
]


@pytest.mark.parametrize(("rules", "message"), REFUSALS)
def test_refusals_name_the_place(rules: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules([with_rules(rules)])
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith(P)


@pytest.mark.parametrize(("ports", "message"), [
    ([{"port": "80"}], f"{P}.ports[0]: L7 rules need protocol TCP, not ANY (no protocol means ANY); write protocol: "
                       "TCP"),
    ([{"port": "80", "protocol": "ANY"}], f"{P}.ports[0]: L7 rules need protocol TCP, not ANY; write protocol: TCP"),
    ([{"port": "80", "protocol": "TCP"}, {"port": "53", "protocol": "UDP"}], f"{P}.ports[1]: L7 rules need protocol "
                                                                            "TCP, not UDP"),
    ([{"port": "80", "protocol": "SCTP"}], "L7 rules need protocol TCP, not SCTP"),
    ([{"port": "8", "protocol": "ICMP"}], "L7 rules need protocol TCP, not ICMP"),
    ([{"port": "0", "protocol": "TCP"}], f"{P}.ports[0]: L7 rules need a port (port 0 means every port)"),
    ([{"protocol": "TCP"}], f"{P}.ports[0]: L7 rules need a port"),
    ([{"port": "http", "protocol": "TCP"}], "named ports are not supported"),  # the port is checked first
])
def test_l7_rules_need_a_tcp_port(ports: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rules([with_rules({"http": [{}]}, ports)])
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("section", ["ingressDeny", "egressDeny"])
@pytest.mark.parametrize("rules", [{"http": [{"method": "GET"}]}, {"kafka": [{}]}, {}])
def test_no_l7_rules_in_deny_rules(section: str, rules: Any) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(
            f"rule 0: {section}[0].toPorts[0].rules: L7 rules are not allowed in deny rules (as Cilium): a deny rule "
            "drops the whole port")):
        parse_rules([with_rules(rules, section=section)])


@pytest.mark.parametrize(("extra", "message"), [
    ({"listener": {"name": "x"}}, "L7 listeners and TLS are not supported yet"),
    ({"terminatingTLS": {"secret": {"name": "s"}}}, "L7 listeners and TLS are not supported yet"),
    ({"serverNames": ["a.example"]}, "L7 listeners and TLS are not supported yet"),
    ({"rule": {}}, "unknown field 'rule' (did you mean 'rules'?)"),
])
def test_listeners_and_tls_stay_refused(extra: dict[str, Any], message: str) -> None:
    raw = with_rules({"http": [{}]})
    raw["ingress"][0]["toPorts"][0].update(extra)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        parse_rules([raw])


@pytest.mark.parametrize("falsy", [{}, [], ""])
def test_stored_rules_keep_a_falsy_rules_as_l4_only(falsy: Any) -> None:
    """An older agent accepted `rules: {}` (and other falsy values) as no L7 rules; restart keeps them."""
    raw = with_rules(falsy)
    r = parse_rule(raw, "stored rule 3", strict=False)
    assert r.ingress[0].ports == (PortRange(TCP, 80, 80),)
    deny = with_rules(falsy, section="ingressDeny")
    assert parse_rule(deny, "stored rule 3", strict=False).ingress_deny[0].ports == (PortRange(TCP, 80, 80),)
    with pytest.raises(InvalidRequest):
        parse_rule(raw, "rule 3")


def test_stored_rules_parse_l7_rules_as_new_ones() -> None:
    r = parse_rule(with_rules({"http": [{"path": "/a"}]}), "stored rule 1", strict=False)
    assert r.ingress[0].ports[0].l7 == L7Rules("http", http=(HttpRule(path="/a"),))


# -- HTTP matching ---------------------------------------------------------------------------------

HTTP_TABLE: list[tuple[dict[str, Any], HttpRequest, bool]] = [
    # the empty entry allows every request
    ({}, get(), True),
    ({}, get("/anything?x=1", "DELETE", host=""), True),
    # method: a regex, full match, case-sensitive
    ({"method": "GET"}, get(), True),
    ({"method": "GET"}, get(method="POST"), False),
    ({"method": "GET|HEAD"}, get(method="HEAD"), True),
    ({"method": "GET"}, get(method="GETX"), False),  # anchored
    ({"method": "G"}, get(), False),  # a full match, not a search
    ({"method": "get"}, get(), False),
    ({"method": "P.*"}, get(method="PATCH"), True),
    # path: full match of the request target as sent, query included
    ({"path": "/public"}, get("/public"), True),
    ({"path": "/public"}, get("/public/x"), False),
    ({"path": "/public"}, get("/xpublic"), False),
    ({"path": "/public/.*"}, get("/public/x/y"), True),
    ({"path": "/public/.*"}, get("/private"), False),
    ({"path": "/a"}, get("/a?x=1"), False),
    ({"path": "/a(\\?.*)?"}, get("/a?x=1"), True),
    ({"path": "/v[0-9]+/items"}, get("/v12/items"), True),
    ({"path": "/v[0-9]+/items"}, get("/vx/items"), False),
    ({"path": "/cloudcity.DoorManager/GetName"}, get("/cloudcity.DoorManager/GetName", "POST"), True),
    # host: Host or :authority, full match
    ({"host": "app"}, get(host="app"), True),
    ({"host": "app"}, get(host="app:8080"), False),
    ({"host": "app(:[0-9]+)?"}, get(host="app:8080"), True),
    ({"host": ".*\\.example\\.com"}, get(host="www.example.com"), True),
    ({"host": "app"}, get(host=""), False),
    # headers: "Name" = present (names case-insensitive)
    ({"headers": ["X-Token"]}, get(X_Token="1"), True),
    ({"headers": ["X-Token"]}, get(x_token=""), True),
    ({"headers": ["x-token"]}, get(X_TOKEN="1"), True),
    ({"headers": ["X-Token"]}, get(), False),
    ({"headers": ["X-Token"]}, get(X_Tokens="1"), False),
    ({"headers": ["X-Token:"]}, get(X_Token="anything"), True),  # a trailing ':' and no value: present
    # headers: "Name: value" = a header of that name whose value fully matches the regex
    ({"headers": ["X-Token: [0-9]+"]}, get(X_Token="123"), True),
    ({"headers": ["X-Token: [0-9]+"]}, get(X_Token="12a"), False),
    ({"headers": ["X-Token: [0-9]+"]}, get(X_Token=""), False),
    ({"headers": ["X-Token: [0-9]+"]}, get(), False),
    ({"headers": ["X-My-Header: true"]}, get(X_My_Header="true"), True),  # literal text: as Cilium
    ({"headers": ["X-My-Header: true"]}, get(X_My_Header="truex"), False),
    ({"headers": ["X-My-Header:true"]}, get(X_My_Header="true"), True),
    ({"headers": ["  X-My-Header  :   true  "]}, get(X_My_Header="true"), True),
    ({"headers": ["X-Url: http://a:1"]}, get(X_Url="http://a:1"), True),  # split at the first ':'
    ({"headers": ["A", "B: 1"]}, get(A="x", B="1"), True),  # ANDed
    ({"headers": ["A", "B: 1"]}, get(B="1"), False),
    # headerMatches: exact strings, no value = present
    ({"headerMatches": [{"name": "X-Env", "value": "prod"}]}, get(x_env="prod"), True),
    ({"headerMatches": [{"name": "X-Env", "value": "prod"}]}, get(X_Env="production"), False),
    ({"headerMatches": [{"name": "X-Env", "value": "a.b"}]}, get(X_Env="axb"), False),  # not a regex
    ({"headerMatches": [{"name": "X-Env", "value": "a.b"}]}, get(X_Env="a.b"), True),
    ({"headerMatches": [{"name": "X-Env"}]}, get(X_Env="whatever"), True),
    ({"headerMatches": [{"name": "X-Env"}]}, get(), False),
    ({"headerMatches": [{"name": "X-Env", "value": "prod"}, {"name": "X-Team"}]}, get(X_Env="prod"), False),
    # the fields of one entry are ANDed
    ({"method": "GET", "path": "/a"}, get("/a"), True),
    ({"method": "GET", "path": "/a"}, get("/a", "POST"), False),
    ({"method": "GET", "path": "/a"}, get("/b"), False),
    ({"method": "GET", "path": "/a", "host": "h", "headers": ["T: 1"], "headerMatches": [{"name": "E", "value": "p"}]},
     get("/a", host="h", T="1", E="p"), True),
    ({"method": "GET", "path": "/a", "host": "h", "headers": ["T: 1"], "headerMatches": [{"name": "E", "value": "p"}]},
     get("/a", host="h", T="1", E="q"), False),
]


@pytest.mark.parametrize(("entry", "req", "allowed"), HTTP_TABLE)
def test_http_matching(entry: dict[str, Any], req: HttpRequest, allowed: bool) -> None:
    verdict = http_filter(entry).http_verdict(req)
    assert verdict.allowed is allowed, verdict.steps
    assert verdict.rule == (3 if allowed else 0)


def test_repeated_headers_any_value_may_match() -> None:
    f = http_filter({"headers": ["X-A: [0-9]+"]}, rule=1)
    assert f.http_verdict(HttpRequest("GET", "/", "", (("X-A", "x"), ("x-a", "7")))).allowed
    g = http_filter({"headerMatches": [{"name": "X-A", "value": "7"}]})
    assert g.http_verdict(HttpRequest("GET", "/", "", (("X-A", "x"), ("X-A", "7")))).allowed
    assert not g.http_verdict(HttpRequest("GET", "/", "", (("X-A", "x"), ("X-B", "7")))).allowed


def test_entries_are_ored_and_the_first_match_names_its_rule() -> None:
    f = L7Filter.of([grant_of(7, "app=b", l7_of({"http": [{"method": "POST"}]})),
                     grant_of(2, "app=a", l7_of({"http": [{"path": "/a"}, {"path": "/b"}]}))])
    assert [g.rule for g in f.grants] == [2, 7]
    assert f.http_verdict(get("/a")).rule == 2
    assert f.http_verdict(get("/b")).rule == 2
    assert f.http_verdict(get("/c", "POST")).rule == 7
    assert not f.http_verdict(get("/c")).allowed


def test_http_steps_explain_rule_by_rule() -> None:
    f = L7Filter.of([grant_of(3, "app=web", l7_of({"http": [{"method": "GET", "path": "/public/.*"}, {}]})),
                     grant_of(1, "rule 1", l7_of({"http": [{"headers": ["X-Token: [0-9]+"]},
                                                           {"headerMatches": [{"name": "X-Env", "value": "prod"}]},
                                                           {"host": "h"}]}))])
    v = f.http_verdict(HttpRequest("POST", "/private", "app", (("x-token", "no"), ("X-Env", "dev"))))
    assert v.allowed and v.rule == 3 and v.steps == (
        'rule 1 http[0] {headers [X-Token: [0-9]+]}: header X-Token "no" does not match',
        'rule 1 http[1] {headerMatches [X-Env=prod]}: header X-Env "dev" is not "prod"',
        'rule 1 http[2] {host h}: host "app" does not match',
        'rule 3 (app=web) http[0] {method GET, path /public/.*}: method "POST" does not match',
        "rule 3 (app=web) http[1] {}: allows",
    )
    g = http_filter({"method": "GET", "path": "/public/.*"})
    v = g.http_verdict(get("/private"))
    assert v == type(v)(False, 0, ('rule 3 (app=web) http[0] {method GET, path /public/.*}: path "/private" does not '
                                   "match", "no L7 rule allows this request"))
    allowed = g.http_verdict(get("/public/x"))
    assert allowed.steps == ("rule 3 (app=web) http[0] {method GET, path /public/.*}: allows",)
    missing = http_filter({"headers": ["X-A"]}).http_verdict(get())
    assert missing.steps[0] == "rule 3 (app=web) http[0] {headers [X-A]}: header X-A is missing"
    long = http_filter({"path": "/a"}).http_verdict(get('/"' + "x" * 300))
    assert long.steps[0].endswith('path "/\\"' + "x" * 198 + '..." does not match')


def test_an_empty_entry_allows_everything_and_says_so() -> None:
    v = http_filter({}).http_verdict(get("/x", "DELETE"))
    assert v.allowed and v.steps == ("rule 3 (app=web) http[0] {}: allows",)


def test_a_filter_without_grants_denies() -> None:
    empty = L7Filter("http", ())
    assert empty.http_verdict(get()) == type(empty.http_verdict(get()))(False, 0, ("no L7 rule allows this request",))
    assert not L7Filter("kafka", ()).kafka_verdict(KafkaRequest(0, 0, None)).allowed


def test_a_request_of_the_other_protocol_is_denied() -> None:
    h = http_filter({})
    k = kafka_filter({})
    v = h.kafka_verdict(KafkaRequest(0, 7, "c", ("t",)))
    assert not v.allowed and v.rule == 0
    assert v.steps == ("the L7 rules here are http rules, not kafka: the request is denied",)
    w = k.http_verdict(get())
    assert not w.allowed and w.steps == ("the L7 rules here are kafka rules, not http: the request is denied",)


def test_grants_of_the_other_kind_allow_nothing() -> None:
    f = L7Filter("http", (Grant(4, "app=x", kafka=(KafkaRule(),)),))
    v = f.http_verdict(get())
    assert not v.allowed and v.steps[0] == "rule 4 (app=x): has no http rules"


def test_regexes_are_compiled_once_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    f = http_filter({"method": "GE.", "path": "/z[0-9]+-unique", "host": "h.*", "headers": ["A: b+c"]})
    assert f.http_verdict(get("/z1-unique", host="h", A="bbc")).allowed
    compiled = f._http_plan  # the plan is made once per filter
    assert f._http_plan is compiled

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("compiled a pattern while deciding")

    monkeypatch.setattr(re, "compile", boom)
    assert f.http_verdict(get("/z2-unique", host="hh", A="bc")).allowed
    assert not f.http_verdict(get("/y")).allowed


def test_a_bad_pattern_that_skipped_the_parser_fails_closed() -> None:
    f = L7Filter.of([Grant(1, "x", http=(HttpRule(path="("),))])
    v = f.http_verdict(get("("))
    assert not v.allowed and "has an invalid pattern" in v.steps[0]


# -- Kafka matching ---------------------------------------------------------------------------------


def produce(*topics: str, key: int = 0, version: int = 7, client: str | None = "c") -> KafkaRequest:
    return KafkaRequest(key, version, client, topics)


def test_roles_are_ciliums_extended_for_modern_clients() -> None:
    assert CILIUM_ROLES["produce"] == {0, 3, 18}
    assert CILIUM_ROLES["consume"] == {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}
    assert ROLES["produce"] == {0, 3, 18, 22, 71}
    assert ROLES["consume"] == {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23, 71}


@pytest.mark.parametrize("role", ["produce", "consume"])
@pytest.mark.parametrize("key", range(76))
def test_role_keys(role: str, key: int) -> None:
    v = kafka_filter({"role": role.upper()}).kafka_verdict(KafkaRequest(key, 0, "c"))
    assert v.allowed is (key in ROLES[role]), v.steps


def test_role_keys_name_the_key() -> None:
    f = kafka_filter({"role": "produce"})
    assert f.kafka_verdict(KafkaRequest(1, 11, "c", ("t",))).steps[0] == (
        "rule 3 (app=kafka) kafka[0] {role produce}: api key fetch (1) is not in role produce")
    assert f.kafka_verdict(KafkaRequest(22, 4, "c")).steps == (
        "rule 3 (app=kafka) kafka[0] {role produce}: allows initproducerid (22)",)
    assert f.kafka_verdict(KafkaRequest(71, 0, "c")).allowed
    assert kafka_key_name(71) == "gettelemetrysubscriptions (71)" and kafka_key_name(99) == "key 99"


@pytest.mark.parametrize(("name", "key"), sorted(KAFKA_API_KEYS.items()))
def test_api_key_names(name: str, key: int) -> None:
    assert KAFKA_API_KEYS[name] == key and len(KAFKA_API_KEYS) == 34 and set(KAFKA_API_KEYS.values()) == set(range(34))
    f = kafka_filter({"apiKey": name.upper()})
    assert f.kafka_verdict(KafkaRequest(key, 0, "c")).allowed
    other = (key + 1) % 34
    v = f.kafka_verdict(KafkaRequest(other, 0, "c"))
    assert not v.allowed
    assert v.steps[0].endswith(f"api key {kafka_key_name(other)} is not {name} ({key})")


@pytest.mark.parametrize(("entry", "req", "allowed"), [
    ({}, produce("a", "b"), True),  # the empty entry allows every message
    ({}, KafkaRequest(71, 0, None), True),
    ({"apiVersion": "7"}, produce(version=7), True),
    ({"apiVersion": "7"}, produce(version=8), False),
    ({"apiVersion": 0}, produce(version=0), True),
    ({"apiKey": "produce", "apiVersion": "9"}, produce(version=9), True),
    ({"apiKey": "produce", "apiVersion": "9"}, produce(key=1, version=9), False),
    ({"clientID": "app-1"}, produce(client="app-1"), True),
    ({"clientID": "app-1"}, produce(client="app-2"), False),
    ({"clientID": "app-1"}, produce(client="APP-1"), False),  # exact
    ({"clientID": "app-1"}, produce(client=None), False),
    ({"clientID": "app-1"}, produce(client=""), False),
    ({"clientID": ""}, produce(client=None), True),
    ({"topic": "a"}, produce("a"), True),
    ({"topic": "a"}, produce("b"), False),
    ({"topic": "a"}, produce("a", "b"), False),  # every topic must be allowed
    ({"topic": "a"}, produce("a", "a"), True),
    ({"topic": "a"}, produce(), True),  # keys without topics: the constraint is ignored
    ({"topic": "a"}, KafkaRequest(18, 3, "c"), True),
    ({"role": "produce", "topic": "a"}, produce("a"), True),
    ({"role": "produce", "topic": "a"}, produce("a", key=1), False),
    ({"role": "produce", "topic": "a"}, KafkaRequest(3, 9, "c", ("b",)), False),  # metadata of another topic
    ({"role": "produce", "topic": "a"}, KafkaRequest(3, 9, "c", ()), True),  # metadata of every topic
    ({"role": "produce", "topic": "a", "clientID": "x"}, produce("a", client="y"), False),
])
def test_kafka_matching(entry: dict[str, Any], req: KafkaRequest, allowed: bool) -> None:
    v = kafka_filter(entry).kafka_verdict(req)
    assert v.allowed is allowed, v.steps
    assert v.rule == (3 if allowed else 0)


def test_topics_add_up_across_entries_and_rules_as_in_cilium() -> None:
    """Cilium's MatchesRule: each matching entry allows its topic; the request passes once every
    topic it names is allowed (by entries of one rule or several)."""
    one = kafka_filter({"role": "produce", "topic": "a"}, {"role": "produce", "topic": "b"})
    v = one.kafka_verdict(produce("a", "b"))
    assert v.allowed and v.steps == (
        "rule 3 (app=kafka) kafka[0] {role produce, topic a}: allows topic a; still to allow: b",
        "rule 3 (app=kafka) kafka[1] {role produce, topic b}: allows topic b; every topic of the request is allowed",
    )
    denied = one.kafka_verdict(produce("a", "c"))
    assert not denied.allowed and denied.steps == (
        "rule 3 (app=kafka) kafka[0] {role produce, topic a}: allows topic a; still to allow: c",
        "rule 3 (app=kafka) kafka[1] {role produce, topic b}: topic b is not in the request",
        "no L7 rule allows this request: no entry allows topic c (every topic of a request must be allowed)",
    )
    two = merge([kafka_filter({"topic": "b"}, rule=9, name="rule 9"), kafka_filter({"topic": "a"}, rule=4)])
    both = two.kafka_verdict(produce("b", "a"))
    assert both.allowed and both.rule == 4  # the lowest rule that allowed a topic
    assert not two.kafka_verdict(produce("a", "b", "c")).allowed
    again = kafka_filter({"topic": "a"}, {"topic": "a"}).kafka_verdict(produce("a", "b"))
    assert "topic a is already allowed" in again.steps[1]


def test_an_entry_without_topic_allows_every_topic() -> None:
    f = kafka_filter({"role": "consume", "topic": "a"}, {"apiKey": "fetch"})
    assert f.kafka_verdict(KafkaRequest(1, 11, "c", ("x", "y"))).allowed
    v = f.kafka_verdict(KafkaRequest(2, 5, "c", ("x",)))
    assert not v.allowed and v.steps[-1] == "no L7 rule allows this request"


def test_kafka_steps_name_version_and_client() -> None:
    f = kafka_filter({"apiVersion": "3", "clientID": "a\"b"})
    assert f.kafka_verdict(produce(version=4)).steps[0] == (
        'rule 3 (app=kafka) kafka[0] {apiVersion 3, clientID a"b}: api version 4 is not 3')
    assert f.kafka_verdict(KafkaRequest(0, 3, None)).steps[0].endswith('client id (none) is not "a\\"b"')


# -- the JSON the proxy reads ----------------------------------------------------------------------

FULL_HTTP = {"method": "GET|HEAD", "path": "/a/.*", "host": "h", "headers": ["X-A", "X-B: [0-9]+"],
             "headerMatches": [{"name": "X-C"}, {"name": "X-D", "value": "v"}]}
FULL_KAFKA = {"role": "consume", "apiVersion": "11", "clientID": "c", "topic": "t"}


@pytest.mark.parametrize("f", [
    L7Filter("http", ()),
    L7Filter("kafka", ()),
    http_filter(FULL_HTTP, {}),
    merge([http_filter({"path": "/a"}, rule=5, name="rule 5"), http_filter(FULL_HTTP, rule=2, name="app=a,team=b")]),
    kafka_filter(FULL_KAFKA, {"apiKey": "apiversions"}, {}),
    L7Filter("http", (Grant(1, "x"), Grant(2, "y", kafka=(KafkaRule(topic="t"),)))),  # odd but exact
])
def test_json_round_trip(f: L7Filter) -> None:
    data = f.to_json()
    assert json.loads(json.dumps(data)) == data  # JSON-safe
    back = L7Filter.from_json(json.loads(json.dumps(data)))
    assert back == f and back.to_json() == data


def test_json_shape() -> None:
    assert kafka_filter({"role": "produce", "apiVersion": 3}).to_json() == {
        "kind": "kafka",
        "grants": [{"rule": 3, "name": "app=kafka", "kafka": [{"role": "produce", "apiVersion": "3"}]}]}


def test_from_json_decides_as_the_original() -> None:
    f = http_filter(FULL_HTTP)
    back = L7Filter.from_json(f.to_json())
    req = HttpRequest("HEAD", "/a/x", "h", (("x-a", ""), ("X-B", "12"), ("X-C", "1"), ("X-D", "v")))
    assert f.http_verdict(req) == back.http_verdict(req) and back.http_verdict(req).allowed


G = {"rule": 1, "name": "x"}


@pytest.mark.parametrize(("data", "message"), [
    (None, "L7 filter: must be an object with kind and grants"),
    ([], "L7 filter: must be an object"),
    ({"kind": "http"}, "L7 filter.grants: must be a list"),
    ({"kind": "http", "grants": {}}, "L7 filter.grants: must be a list"),
    ({"kind": "grpc", "grants": []}, "L7 filter.kind: must be http or kafka"),
    ({"grants": []}, "L7 filter.kind: must be http or kafka"),
    ({"kind": "http", "grants": [], "extra": 1}, "L7 filter: unknown field 'extra'"),
    ({"kind": "http", "grants": ["x"]}, "L7 filter.grants[0]: must be an object"),
    ({"kind": "http", "grants": [{**G, "dns": []}]}, "L7 filter.grants[0]: unknown field 'dns'"),
    ({"kind": "http", "grants": [{"name": "x"}]}, "L7 filter.grants[0].rule: must be a rule id"),
    ({"kind": "http", "grants": [{**G, "rule": True}]}, "L7 filter.grants[0].rule: must be a rule id"),
    ({"kind": "http", "grants": [{**G, "rule": -1}]}, "L7 filter.grants[0].rule: must be a rule id"),
    ({"kind": "http", "grants": [{**G, "rule": "1"}]}, "L7 filter.grants[0].rule: must be a rule id"),
    ({"kind": "http", "grants": [{"rule": 1}]}, "L7 filter.grants[0].name: must be a string"),
    ({"kind": "http", "grants": [{**G, "http": {}}]}, "L7 filter.grants[0].http: must be a list"),
    ({"kind": "http", "grants": [{**G, "http": [{"path": "("}]}]}, "L7 filter.grants[0].http[0].path: '(' is not a "
                                                                   "regular expression"),
    ({"kind": "http", "grants": [{**G, "http": [{"headerMatches": [{"name": "a", "secret": {}}]}]}]},
     "L7 filter.grants[0].http[0].headerMatches[0].secret: headerMatches secrets are not supported yet"),
    ({"kind": "kafka", "grants": [{**G, "kafka": [{"role": "admin"}]}]}, "L7 filter.grants[0].kafka[0].role: "
                                                                        "invalid Kafka role"),
    ({"kind": "kafka", "grants": [{**G, "kafka": [{"topic": "a b"}]}]}, "invalid Kafka topic name"),
])
def test_from_json_refuses_bad_data(data: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        L7Filter.from_json(data)
    assert message in str(err.value), str(err.value)


# -- grants, merging ----------------------------------------------------------------------------------


def test_grant_of() -> None:
    l7 = l7_of({"http": [{"method": "GET"}]})
    g = grant_of(4, "app=x", l7)
    assert g == Grant(4, "app=x", http=(HttpRule(method="GET"),)) and g.kind == "http" and g.label == "rule 4 (app=x)"
    assert grant_of(4, "rule 4", l7).label == "rule 4" and grant_of(4, "", l7).label == "rule 4"
    k = grant_of(5, "n", l7_of({"kafka": [{}]}))
    assert k.kind == "kafka" and k.http == () and Grant(1, "x").kind == ""


def test_merge_unions_dedups_and_orders_by_rule_id() -> None:
    a = http_filter({"path": "/a"}, rule=5, name="rule 5")
    b = http_filter({"path": "/b"}, rule=2, name="app=b")
    c = http_filter({"path": "/c"}, rule=5, name="rule 5")  # rule 5 again, another toPorts entry
    m = merge([a, b, c, a, b])
    assert [(g.rule, g.http[0].path) for g in m.grants] == [(2, "/b"), (5, "/a"), (5, "/c")]
    assert m.kind == "http" and merge([m]) == m and merge([m, m]) == m
    assert m.describe() == ("rule 2 (app=b) http[0] {path /b}", "rule 5 http[0] {path /a}", "rule 5 http[0] {path /c}")
    assert m.http_verdict(get("/c")).rule == 5 and m.http_verdict(get("/b")).rule == 2
    assert merge([L7Filter("kafka", ()), kafka_filter({})]).grants == kafka_filter({}).grants


def test_merge_refuses_mixed_protocols() -> None:
    with pytest.raises(InvalidRequest, match="one port takes one L7 protocol"):
        merge([http_filter({}), kafka_filter({}, rule=4)])
    with pytest.raises(InvalidRequest, match=re.escape("rule 3 (app=web) puts http rules and rule 4 (k) kafka rules "
                                                       "on one port")):
        L7Filter.of([grant_of(3, "app=web", l7_of({"http": [{}]})), grant_of(4, "k", l7_of({"kafka": [{}]}))])
    with pytest.raises(InvalidRequest, match="one port takes one L7 protocol"):
        L7Filter.of([grant_of(3, "app=web", l7_of({"http": [{}]}))], kind="kafka")
    with pytest.raises(ValueError):
        merge([])
    with pytest.raises(ValueError):
        L7Filter.of([])
    assert L7Filter.of([], kind="http") == L7Filter("http", ())


def test_parse_functions_take_the_place() -> None:
    with pytest.raises(InvalidRequest, match=r"^here\.path: must be a string$"):
        parse_http_rule({"path": 1}, "here")
    with pytest.raises(InvalidRequest, match=r"^there: unknown field 'x'$"):
        parse_kafka_rule({"x": 1}, "there")
    assert parse_http_rule({}, "e") == HttpRule() and parse_kafka_rule({"TOPIC": None}, "e") == KafkaRule()
