"""datapath.policy.trace: rule-by-rule explanations whose verdict is the datapath's (decide over compiled entries)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from datapath import identity as ids
from datapath.labels import Label, LabelSet
from datapath.policy import Rule, parse_rules
from datapath.policy.compile import compile_all, decide
from datapath.policy.trace import Party, parse_dport, trace


def L(*texts: str) -> LabelSet:
    return frozenset(Label.parse(t, "container") for t in texts)


WEB = Party(256, L("app=web", "env=prod"), True)
DB = Party(257, L("app=db", "env=prod"), True)
DEV = Party(258, L("app=db", "env=dev"), True)
CACHE = Party(259, L("app=cache"), True)
REMOTE = Party(300, L("app=db", "env=prod"), False)  # a label twin of DB that is not an endpoint here
HOST = Party(ids.HOST, ids.RESERVED_LABELS[ids.HOST], False)
WORLD = Party(ids.WORLD, ids.RESERVED_LABELS[ids.WORLD], False)
INIT = Party(ids.INIT, ids.RESERVED_LABELS[ids.INIT], True)
NEWDB = Party(0x7FFF0000, L("app=db", "env=prod"), True)  # labels no endpoint has yet
IDENTITIES = {**ids.RESERVED_LABELS, **{p.identity: p.labels for p in (WEB, DB, DEV, CACHE, REMOTE)}}

APP = {"web": {"matchLabels": {"app": "web"}}, "db": {"matchLabels": {"app": "db"}},
       "dev": {"matchLabels": {"app": "db", "env": "dev"}}}


def tcp(*ps: str) -> list[dict[str, Any]]:
    return [{"ports": [{"port": p, "protocol": "TCP"} for p in ps]}]


R_L4 = [{"labels": ["name=web-l4"], "endpointSelector": APP["web"],
         "ingress": [{"fromEndpoints": [APP["db"]], "toPorts": tcp("80")}]}]
R_REQ = [
    {"endpointSelector": {"matchLabels": {"env": "prod"}},
     "ingress": [{"fromRequires": [{"matchLabels": {"env": "prod"}}]}]},
    {"endpointSelector": APP["web"], "ingress": [{"fromEndpoints": [APP["db"]]}, {"fromEntities": ["host"]}]},
]
R_DENY = [{"endpointSelector": APP["web"], "ingress": [{"fromEntities": ["all"]}],
           "ingressDeny": [{"fromEndpoints": [APP["db"]], "toPorts": tcp("81")}]}]
R_EGRESS = [
    {"endpointSelector": APP["db"], "egress": [{"toEndpoints": [APP["web"]], "toPorts": tcp("80")}]},
    {"endpointSelector": APP["web"], "ingress": [{"fromEntities": ["all"]}]},
]
R_EGRESS_OFF = [{"endpointSelector": APP["dev"], "egress": [{}]}]
R_HOST = [{"endpointSelector": APP["web"], "ingress": [{"fromEntities": ["host"]}]}]
R_RANGE = [{"endpointSelector": APP["web"], "ingress": [{"toPorts": [{"ports": [
    {"port": "8000", "endPort": 8080, "protocol": "TCP"}]}]}]}]
R_WORLD = [{"endpointSelector": {}, "ingress": [{"fromEntities": ["all"]}]},
           {"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["world"]}]}]
R_BOTH_DENY = [{"endpointSelector": APP["db"], "egress": [{"toEntities": ["all"]}],
                "egressDeny": [{"toEndpoints": [APP["web"]], "toPorts": tcp("22")}]},
               {"endpointSelector": APP["web"], "ingress": [{"fromEndpoints": [APP["db"]]}],
                "ingressDeny": [{"fromEndpoints": [APP["db"]], "toPorts": tcp("22", "23")}]}]

CASES = [
    # (id, rules, mode, src, dst, dport, allowed, decided by "side:rule" (the denying side, else ingress))
    ("l4 from db on 80", R_L4, "default", DB, WEB, "80/tcp", True, "ingress:1"),
    ("l4 from db on 81", R_L4, "default", DB, WEB, "81/tcp", False, "ingress:0"),
    ("l4 from db on 80/udp", R_L4, "default", DB, WEB, "80/udp", False, "ingress:0"),
    ("l4 from dev (app=db) on 80", R_L4, "default", DEV, WEB, "80/tcp", True, "ingress:1"),
    ("l4 from cache", R_L4, "default", CACHE, WEB, "80/tcp", False, "ingress:0"),
    ("l4 from a remote db", R_L4, "default", REMOTE, WEB, "80/tcp", True, "ingress:1"),
    ("l4 not selected: open", R_L4, "default", WEB, DB, "80/tcp", True, "ingress:0"),
    ("l4 from labels no endpoint has", R_L4, "default", NEWDB, WEB, "80/tcp", True, "ingress:1"),
    ("requires met", R_REQ, "default", DB, WEB, "5432/tcp", True, "ingress:2"),
    ("requires not met by dev", R_REQ, "default", DEV, WEB, "5432/tcp", False, "ingress:1"),
    ("requires not met by the host", R_REQ, "default", HOST, WEB, "80/tcp", False, "ingress:1"),
    ("requires alone allow nothing", R_REQ, "default", WEB, DB, "80/tcp", False, "ingress:0"),
    ("deny beats allow-all", R_DENY, "default", DB, WEB, "81/tcp", False, "ingress:1"),
    ("deny elsewhere", R_DENY, "default", DB, WEB, "80/tcp", True, "ingress:1"),
    ("deny other peer", R_DENY, "default", CACHE, WEB, "81/tcp", True, "ingress:1"),
    ("deny not for world", R_DENY, "default", WORLD, WEB, "81/tcp", True, "ingress:1"),
    ("egress allowed", R_EGRESS, "default", DB, WEB, "80/tcp", True, "ingress:2"),
    ("egress other port", R_EGRESS, "default", DB, WEB, "443/tcp", False, "egress:0"),
    ("egress other peer", R_EGRESS, "default", DB, CACHE, "80/tcp", False, "egress:0"),
    ("egress to world", R_EGRESS, "default", DB, WORLD, "80/tcp", False, "egress:0"),
    ("egress off", R_EGRESS_OFF, "default", DEV, WEB, "80/tcp", False, "egress:0"),
    ("egress off, other way", R_EGRESS_OFF, "default", WEB, DEV, "80/tcp", True, "ingress:0"),
    ("host entity", R_HOST, "default", HOST, WEB, "22/tcp", True, "ingress:1"),
    ("host entity, not world", R_HOST, "default", WORLD, WEB, "22/tcp", False, "ingress:0"),
    ("range low", R_RANGE, "default", DB, WEB, "8000/tcp", True, "ingress:1"),
    ("range high", R_RANGE, "default", WORLD, WEB, "8080/tcp", True, "ingress:1"),
    ("past range", R_RANGE, "default", DB, WEB, "8081/tcp", False, "ingress:0"),
    ("world denied everywhere", R_WORLD, "default", WORLD, CACHE, "80/tcp", False, "ingress:2"),
    ("world rule allows others", R_WORLD, "default", HOST, CACHE, "80/tcp", True, "ingress:1"),
    ("both sides deny, egress first", R_BOTH_DENY, "default", DB, WEB, "22/tcp", False, "egress:1"),
    ("ingress deny only", R_BOTH_DENY, "default", DB, WEB, "23/tcp", False, "ingress:2"),
    ("neither denies", R_BOTH_DENY, "default", DB, WEB, "24/tcp", True, "ingress:2"),
    ("mode never", R_EGRESS_OFF, "never", DEV, WEB, "80/tcp", True, "ingress:0"),
    ("mode always, no rules", [], "always", DB, WEB, "80/tcp", False, "egress:0"),
    ("init sender with rules", R_L4, "default", INIT, CACHE, "80/tcp", False, "egress:0"),
    ("init receiver with rules", R_L4, "default", CACHE, INIT, "80/tcp", False, "ingress:0"),
    ("init without rules", [], "default", INIT, CACHE, "80/tcp", True, "ingress:0"),
]


def numbered(raw: list[dict[str, Any]]) -> list[Rule]:
    return [replace(r, id=i) for i, r in enumerate(parse_rules(raw) if raw else [], start=1)]


@pytest.mark.parametrize(("rules_raw", "mode", "src", "dst", "dport", "allowed", "decided"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_trace_verdict_is_the_datapath_s(rules_raw: list[dict[str, Any]], mode: str, src: Party, dst: Party,
                                         dport: str, allowed: bool, decided: str) -> None:
    rules = numbered(rules_raw)
    proto, port = parse_dport(dport)
    result = trace(rules, IDENTITIES, mode, src, dst, proto, port)
    assert result.allowed is allowed
    assert result.lines[-1] == f"Final verdict: {'ALLOWED' if allowed else 'DENIED'}"

    # The same question asked of the whole compiled map, as the agent writes it into the kernel.
    identities = {**IDENTITIES, src.identity: src.labels, dst.identity: dst.labels}
    subjects = {p.identity: p.labels for p in (src, dst) if p.local}
    entries = compile_all(subjects, rules, identities, mode)
    egress = decide(entries, src.identity, True, dst.identity, proto, port) if src.local else None
    ingress = decide(entries, dst.identity, False, src.identity, proto, port) if dst.local else None
    assert (result.egress, result.ingress) == (egress, ingress)
    assert all(d.allowed for d in (egress, ingress) if d) is allowed

    side, rule = decided.split(":")
    decision = result.egress if side == "egress" else result.ingress
    assert decision is not None and decision.rule == int(rule)
    verdict_line = next(x for x in result.lines if x.startswith(f"  {side.capitalize()} verdict:"))
    if int(rule):
        assert f"by rule {rule} " in verdict_line
        assert any(x.startswith(f"  * rule {rule}") for x in result.lines), "the deciding rule is not listed"
    if not decision.allowed:
        assert "DENIED" in verdict_line
    if not decision.allowed and int(rule):
        assert any("MATCHES, denies" in x or "NOT met, denies" in x for x in result.lines)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 20
    assert {c[6] for c in CASES} == {True, False}
    assert any(c[7].startswith("egress") for c in CASES) and any(c[1] == R_REQ for c in CASES)


def test_a_trace_reads_like_cilium_s() -> None:
    rules = numbered(R_L4 + R_REQ)
    result = trace(rules, IDENTITIES, "default", DEV, WEB, 6, 80)
    assert result.lines == [
        "Tracing From: [container:app=db, container:env=dev] (identity 258) => "
        "To: [container:app=web, container:env=prod] (identity 256) Port: 80/tcp",
        "Egress of [container:app=db, container:env=dev] (identity 258):",
        "  default allow: no rule selects it in this direction",
        "  no rule selects it",
        "  Egress verdict: ALLOWED by default allow (entry egress any any)",
        "Ingress of [container:app=web, container:env=prod] (identity 256):",
        "  default deny: a rule selects it in this direction",
        '  * rule 1 (name=web-l4) selects it ({"matchLabels":{"app":"web"}})',
        '      allows from endpoints {"matchLabels":{"app":"db"}} on 80/TCP: matches',
        '  * rule 2 selects it ({"matchLabels":{"env":"prod"}})',
        "      allows nothing (only turns enforcement on) on every port: peer not matched",
        '      requires {"matchLabels":{"env":"prod"}}: NOT met, denies',
        '  * rule 3 selects it ({"matchLabels":{"app":"web"}})',
        '      allows from endpoints {"matchLabels":{"app":"db"}} on every port: matches',
        "      allows from entities host on every port: peer not matched",
        "  Ingress verdict: DENIED by rule 2 (entry ingress 258 any)",
        "Final verdict: DENIED",
    ]


def test_parties_that_are_not_endpoints_here_have_no_policy_side() -> None:
    result = trace(numbered(R_HOST), IDENTITIES, "default", HOST, WORLD, 6, 80)
    assert result.egress is None and result.ingress is None and result.allowed
    assert "Egress: [reserved:host] (identity 1) is not an endpoint here; no egress policy applies" in result.lines
    assert "Ingress: [reserved:world] (identity 2) is not an endpoint here; no ingress policy applies" in result.lines


def test_mode_lines() -> None:
    never = trace(numbered(R_L4), IDENTITIES, "never", DB, WEB, 6, 81).lines
    assert "  enforcement is off (--enforcement never)" in never
    init = trace(numbered(R_L4), IDENTITIES, "default", INIT, WEB, 6, 80).lines
    assert "  labels not known yet (init identity): default deny until they are" in init
    assert "  Egress verdict: DENIED (no entry allows it: default deny)" in init


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("80/tcp", (6, 80)), ("80", (6, 80)), ("53/UDP", (17, 53)), ("8/icmp", (1, 8)), ("0/tcp", (6, 0)),
     ("65535/sctp", (132, 65535)), ("128/icmpv6", (58, 128))],
)
def test_parse_dport(text: str, parsed: tuple[int, int]) -> None:
    assert parse_dport(text) == parsed


@pytest.mark.parametrize("text", ["http", "80/xtp", "70000/tcp", "-1/tcp", "/tcp", "²/tcp", "80/tcp/x"])
def test_parse_dport_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dport(text)
