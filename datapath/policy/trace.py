"""`policy trace`: explain rule by rule why a flow is allowed or denied. Pure; imports the rules
and compile, never parse or the repository.

Both sides are explained: the sender's egress and the receiver's ingress. The verdict of
each side comes from datapath.policy.compile.decide over the compiled entries, which is the
kernel's own algorithm, so the trace cannot disagree with the datapath.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from datapath import identity as ids
from datapath.cidr import is_cidr_identity, prefix_of
from datapath.labels import LabelSet, render
from datapath.policy.compile import (
    Decision,
    compile_subject,
    decide,
    enforcement,
    selects_backend,
    service_cidrs,
    service_selectors,
)
from datapath.policy.l7 import HttpRequest, KafkaRequest, L7Verdict
from datapath.policy.rules import NO_SERVICES, PeerRule, PortRange, Rule, ServicePeers

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}


@dataclass(frozen=True)
class Party:
    identity: int
    labels: LabelSet
    local: bool  # an endpoint on this host, so its own policy applies
    address: str = ""  # the address it was given by, with how the datapath resolves it (shown)


L7Request = HttpRequest | KafkaRequest


@dataclass
class TraceResult:
    lines: list[str] = field(default_factory=list)
    egress: Decision | None = None
    ingress: Decision | None = None
    l7_egress: L7Verdict | None = None  # the sender's L7 rules on the request (None: none apply)
    l7_ingress: L7Verdict | None = None

    @property
    def allowed(self) -> bool:
        return (all(d.allowed for d in (self.egress, self.ingress) if d is not None)
                and all(v.allowed for v in (self.l7_egress, self.l7_ingress) if v is not None))


def parse_dport(text: str) -> tuple[int, int]:
    """`80/tcp` (protocol defaults to tcp) into (protocol number, port)."""
    port, _, proto = text.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTO_NUMBERS:
        raise ValueError(f"unknown protocol {proto!r} in {text!r}")
    limit = 255 if proto in ("icmp", "icmpv6") else 65535  # an ICMP "port" is its type
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= limit:  # "²".isdigit() is true
        raise ValueError(f"bad port in {text!r}: give 0-{limit}")
    return PROTO_NUMBERS[proto], int(port)


def _who(p: Party) -> str:
    where = f"{p.address} " if p.address else ""
    labels = render(p.labels)
    if is_cidr_identity(p.identity):  # its own prefix, not the 33 (or 129) enclosing ones
        prefix = prefix_of(p.labels)
        labels = [f"cidr:{prefix}", "reserved:world"] if prefix else labels
    return where + "[" + ", ".join(labels) + f"] (identity {p.identity})"


def _port_matches(ranges: tuple[PortRange, ...], proto: int, port: int) -> bool:
    if not ranges:
        return True
    return any((r.protocol in (0, proto)) and (r.first == 0 or r.first <= port <= r.last) for r in ranges)


def _peer_matches(pr: PeerRule, peer: Party, services: ServicePeers = NO_SERVICES) -> bool:
    if pr.nobody:
        return False
    for sel in pr.endpoints:
        if sel.matches(peer.labels):
            return True
    if any(selects_backend(sel, peer.labels) for sel in service_selectors(pr, services)):
        return True
    cidrs = pr.cidrs + service_cidrs(pr, services) if pr.services else pr.cidrs
    if is_cidr_identity(peer.identity) and any(c.matches(peer.labels) for c in cidrs):
        return True
    outside = peer.identity == ids.WORLD or is_cidr_identity(peer.identity)
    for entity in pr.entities:
        if entity == "all" or (entity == "cluster" and not outside) or (entity == "world" and outside):
            return True
        if {"host": ids.HOST, "init": ids.INIT, "remote-node": ids.REMOTE_NODE,
                "unmanaged": ids.UNMANAGED}.get(entity) == peer.identity:
            return True
    return not pr.has_l3 and bool(pr.ports)


def _service(name: str, services: ServicePeers) -> str:
    target = services.get(name)
    if target is None:
        return f"{name} (no such service: allows nothing)"
    if target.selector is not None:
        return f"{name} (endpoints {target.selector.text})"
    if not target.prefixes:
        return f"{name} (no backends)"
    return f"{name} (backends {', '.join(map(str, target.prefixes))})"


def _describe(pr: PeerRule, egress: bool, services: ServicePeers = NO_SERVICES) -> str:
    parts = []
    word = "to" if egress else "from"
    if pr.endpoints:
        parts.append(f"{word} endpoints " + " | ".join(s.text for s in pr.endpoints))
    if pr.entities:
        parts.append(f"{word} entities {', '.join(pr.entities)}")
    if pr.cidrs:
        parts.append(f"{word} CIDR " + " | ".join(str(c) for c in pr.cidrs))
    if pr.services:
        parts.append(f"{word} services " + " | ".join(_service(n, services) for n in pr.services))
    if pr.nobody:
        parts.append(f"{word} no one (an empty list of peers selects nothing)")
    elif not pr.has_l3:
        parts.append(f"{word} anyone" if pr.ports else "nothing (only turns enforcement on)")
    parts.append("on " + ", ".join(str(r) for r in pr.ports) if pr.ports else "on every port")
    return " ".join(parts)


def _side(result: TraceResult, subject: Party, peer: Party, egress: bool, rules: list[Rule],
          identities: Mapping[int, LabelSet], mode: str, proto: int, port: int,
          services: ServicePeers = NO_SERVICES) -> Decision:
    direction = "Egress" if egress else "Ingress"
    lines = result.lines
    lines.append(f"{direction} of {_who(subject)}:")
    enf = enforcement(subject.identity, subject.labels, rules, mode)
    on = enf.egress if egress else enf.ingress
    if mode == "never":
        lines.append("  enforcement is off (--enforcement never)")
    elif subject.identity == ids.INIT and on:
        lines.append("  labels not known yet (init identity): default deny until they are")
    elif on:
        lines.append("  default deny: a rule selects it in this direction")
    else:
        lines.append("  default allow: no rule selects it in this direction")
    selected = [r for r in rules if r.selector.matches(subject.labels)]
    for rule in rules:
        if rule not in selected:
            continue
        allows = rule.egress if egress else rule.ingress
        denies = rule.egress_deny if egress else rule.ingress_deny
        if not allows and not denies:
            continue
        title = f"rule {rule.id} ({rule.name})" if rule.labels else f"rule {rule.id}"
        lines.append(f"  * {title} selects it ({rule.selector.text})")
        for pr in allows:
            peer_ok, port_ok = _peer_matches(pr, peer, services), _port_matches(pr.ports, proto, port)
            verdict = "matches" if peer_ok and port_ok else ("port does not match" if peer_ok else "peer not matched")
            lines.append(f"      allows {_describe(pr, egress, services)}: {verdict}")
            for sel in pr.requires:
                ok = sel.matches(peer.labels)
                lines.append(f"      requires {sel.text}: {'met' if ok else 'NOT met, denies'}")
        for pr in denies:
            hit = _peer_matches(pr, peer, services) and _port_matches(pr.ports, proto, port)
            lines.append(f"      denies {_describe(pr, egress, services)}: "
                         f"{'MATCHES, denies' if hit else 'does not match'}")
    if not selected:
        lines.append("  no rule selects it")
    ident_map = dict(identities)
    ident_map[subject.identity] = subject.labels
    ident_map[peer.identity] = peer.labels
    entries = compile_subject(subject.identity, subject.labels, rules, ident_map, mode, services=services)
    decision = decide(entries, subject.identity, egress, peer.identity, proto, port)
    if decision.key is None:
        lines.append(f"  {direction} verdict: DENIED (no entry allows it: default deny)")
    else:
        by = f"rule {decision.rule}" if decision.rule else "default allow"
        word = "ALLOWED" if decision.allowed else "DENIED"
        lines.append(f"  {direction} verdict: {word} by {by} (entry {decision.key.describe()})")
    return decision


def _l7_side(result: TraceResult, decision: Decision | None, egress: bool, request: L7Request | None) -> None:
    """The L7 rules of the deciding entry on the request, as the proxy decides it."""
    f = decision.value.filter if decision is not None and decision.allowed and decision.value else None
    if f is None:
        return
    direction = "Egress" if egress else "Ingress"
    lines = result.lines
    if f.grants:
        lines.append(f"  {direction} L7: the flow goes through the proxy ({f.kind} rules of "
                     + ", ".join(f"rule {g.rule}" for g in f.grants) + ")")
    else:  # http and kafka rules on one port (compile fails closed)
        lines.append(f"  {direction} L7: the flow goes through the proxy, which denies every request "
                     "(http and kafka rules on one port)")
    if request is None:
        lines.append("    no request given (--http-method/--http-path, or --kafka-api-key/--kafka-topic): "
                     "every request is decided by these rules")
        return
    verdict = f.http_verdict(request) if isinstance(request, HttpRequest) else f.kafka_verdict(request)
    lines.extend(f"    {step}" for step in verdict.steps)
    word = f"ALLOWED by rule {verdict.rule}" if verdict.allowed else "DENIED (no L7 rule allows it)"
    lines.append(f"  {direction} L7 verdict: {word}")
    if egress:
        result.l7_egress = verdict
    else:
        result.l7_ingress = verdict


def trace(rules: list[Rule], identities: Mapping[int, LabelSet], mode: str, src: Party, dst: Party,
          proto: int, port: int, request: L7Request | None = None,
          services: ServicePeers = NO_SERVICES) -> TraceResult:
    """`services`: what the names of toServices entries stand for (as the compile takes them)."""
    result = TraceResult()
    names = {v: k for k, v in PROTO_NUMBERS.items()}
    result.lines.append(f"Tracing From: {_who(src)} => To: {_who(dst)} Port: {port}/{names.get(proto, proto)}")
    if src.local:
        result.egress = _side(result, src, dst, True, rules, identities, mode, proto, port, services)
        _l7_side(result, result.egress, True, request)
    else:
        result.lines.append(f"Egress: {_who(src)} is not an endpoint here; no egress policy applies")
    if dst.local:
        result.ingress = _side(result, dst, src, False, rules, identities, mode, proto, port, services)
        _l7_side(result, result.ingress, False, request)
    else:
        result.lines.append(f"Ingress: {_who(dst)} is not an endpoint here; no ingress policy applies")
    result.lines.append(f"Final verdict: {'ALLOWED' if result.allowed else 'DENIED'}")
    return result
