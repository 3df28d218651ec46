"""Strict parsing of decoded JSON/YAML into rules (plain rules and Cilium CRDs), with the bounds a
policy must stay within. Pure; imports selectors, rules, l7 and datapath.cidr, never the repository or
compile.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from datapath.cidr import CidrSelector, parse_prefix
from datapath.errors import InvalidRequest
from datapath.labels import Label
from datapath.policy.l7 import L7Rules, parse_l7_rules
from datapath.policy.rules import (
    CCNP,
    CNP,
    ENTITIES,
    MAX_PORTS,
    NOT_YET,
    PLAIN,
    PORTED,
    PROTOCOLS,
    PeerRule,
    PortRange,
    Rule,
    Scope,
)
from datapath.policy.selectors import DEFAULT_NAMESPACE, Selector, _only, parse_selector

# -- bounds of what a policy may be ------------------------------------------------------------

MAX_BYTES = 1 << 20  # a policy as JSON (what the agent's REST API takes, plugin.api.app.MAX_BODY)
MAX_DEPTH = 32  # nesting levels; a real policy needs about 12
MAX_NODES = 200_000  # values after YAML aliases are expanded; 1 MiB of real rules is about 90k


def check_shape(data: Any) -> None:
    """Refuse input nested deeper than MAX_DEPTH or holding more than MAX_NODES values (shared
    values count every time they appear, as after YAML alias expansion; a cycle is infinitely
    deep). Stops at the first excess, so hostile input costs little; recursion is bounded by
    MAX_DEPTH."""
    count = 1

    def walk(value: Any, depth: int) -> None:
        nonlocal count
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the policy is nested too deeply: more than {MAX_DEPTH} levels")
        count += len(value)
        if count > MAX_NODES:
            raise InvalidRequest(f"the policy is too large: more than {MAX_NODES} values")
        for v in value.values() if isinstance(value, dict) else value:
            if isinstance(v, (dict, list)):
                walk(v, depth + 1)

    if isinstance(data, (dict, list)):
        walk(data, 1)


_NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Kubernetes namespace (DNS-1123 label)


RULE_FIELDS = ("endpointSelector", "ingress", "egress", "ingressDeny", "egressDeny", "labels", "description",
               "enableDefaultDeny")
RULE_NOT_YET = {"nodeSelector": "host policies (nodeSelector) are not supported yet",
                "log": "policy logging (log) is not supported yet"}
SECTIONS = (("ingress", False), ("egress", True), ("ingressDeny", False), ("egressDeny", True))
NO_SECTION = "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"  # Cilium's words


def parse_rules(data: Any) -> list[Rule]:
    """Rules from decoded JSON/YAML: a list of rules, one rule, or CiliumNetworkPolicy /
    CiliumClusterwideNetworkPolicy objects (or a mix)."""
    check_shape(data)
    docs = data if isinstance(data, list) else [data]
    rules: list[Rule] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and ("spec" in doc or "specs" in doc or "kind" in doc):
            rules.extend(_parse_crd(doc, i))
        else:
            rules.append(parse_rule(doc, f"rule {i}"))
    if not rules:
        raise InvalidRequest("the policy holds no rules")
    return rules


def _parse_crd(doc: dict[str, Any], index: int) -> list[Rule]:
    """A CRD's rules, as Cilium's CiliumNetworkPolicy.Parse: `spec` and then every one of `specs`."""
    where = f"policy {index}"
    _only(doc, ("apiVersion", "kind", "metadata", "spec", "specs"), where)
    kind = doc.get("kind", CNP)
    if kind not in (CNP, CCNP):
        raise InvalidRequest(f"{where}: unsupported kind {kind!r}")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name", ""), str):
        raise InvalidRequest(f"{where}: metadata must be an object with a string name")
    name = metadata.get("name", "")
    namespace = metadata.get("namespace")
    if kind == CCNP:
        if namespace not in (None, ""):
            raise InvalidRequest(f"{where}: metadata.namespace: a {CCNP} is clusterwide and has no namespace")
        scope = Scope(CCNP)
    else:
        if namespace is None or namespace == "":
            namespace = DEFAULT_NAMESPACE
        if not isinstance(namespace, str) or not _NAMESPACE_NAME.fullmatch(namespace):  # `$` takes "x\n"
            raise InvalidRequest(f"{where}: metadata.namespace: {namespace!r} is not a namespace name "
                                 "(lower-case letters, digits and '-', at most 63)")
        scope = Scope(CNP, namespace)
    specs: list[tuple[str, Any]] = []
    if doc.get("spec") is not None:
        specs.append((f"{where} spec", doc["spec"]))
    if doc.get("specs") is not None:
        if not isinstance(doc["specs"], list):
            raise InvalidRequest(f"{where}: specs must be a list of rules")
        specs.extend((f"{where} specs[{j}]", spec) for j, spec in enumerate(doc["specs"]))
    if not specs:
        raise InvalidRequest(f"{where}: a {kind} needs spec or specs (it holds no rules)")
    out = []
    for place, spec in specs:
        rule = parse_rule(spec, place, scope)
        if name and not rule.labels:  # named by the object: the stored spec carries it too
            labels = [Label("unspec", "name", name)]
            if scope.namespace:  # two namespaces' policies of one name are two policies
                labels.append(Label("unspec", "namespace", scope.namespace))
            rule = dataclasses.replace(rule, labels=tuple(labels), spec={
                **spec, "labels": [{"key": lb.key, "value": lb.value, "source": lb.source} for lb in labels]})
        out.append(rule)
    return out


def parse_rule(raw: Any, where: str, scope: Scope = PLAIN, strict: bool = True) -> Rule:
    """One rule. `strict=False` is for rules an older agent stored: it still takes what was
    accepted then and has since been refused (each was a no-op or as open as it reads), so a
    restart never drops a rule in force."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: must be an object")
    for key, why in RULE_NOT_YET.items():
        if key in raw:
            raise InvalidRequest(f"{where}: {key}: {why}")
    _only(raw, RULE_FIELDS, where)
    if "endpointSelector" not in raw or raw["endpointSelector"] is None:
        raise InvalidRequest(f"{where}: endpointSelector is required")
    selector = parse_selector(raw["endpointSelector"], f"{where}: endpointSelector")
    if strict or scope.kind:
        selector = scope.subject(selector, f"{where}: endpointSelector")
    parts: dict[str, tuple[PeerRule, ...]] = {}
    for key, egress in SECTIONS:
        value = raw.get(key)
        if value is None:
            parts[key] = ()
            continue
        if not isinstance(value, list):
            raise InvalidRequest(f"{where}: {key} must be a list")
        if not value and strict and not key.endswith("Deny"):
            raise InvalidRequest(f"{where}: {key}: an empty list enforces nothing (Cilium ignores it); write "
                                 f"{key}: [{{}}] to deny all {key}, or leave it out")
        parts[key] = tuple(_peer_rule(p, f"{where}: {key}[{j}]", egress, key.endswith("Deny"), scope, strict)
                           for j, p in enumerate(value))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}: description must be a string")
    edd = raw.get("enableDefaultDeny")
    default_deny: tuple[bool | None, bool | None] = (None, None)
    if edd is not None:
        if not isinstance(edd, dict):
            raise InvalidRequest(f"{where}: enableDefaultDeny must be an object with ingress/egress booleans")
        _only(edd, ("ingress", "egress"), f"{where}: enableDefaultDeny")
        for key in ("ingress", "egress"):
            if key in edd and not isinstance(edd[key], bool):
                raise InvalidRequest(f"{where}: enableDefaultDeny.{key} must be true or false")
        default_deny = (edd.get("ingress"), edd.get("egress"))
    labels = _rule_labels(raw.get("labels"), where)
    if strict and not any(parts.values()):
        raise InvalidRequest(f"{where}: {NO_SECTION} (egress: [{{}}] denies all egress)")
    return Rule(
        selector=selector,
        ingress=parts["ingress"],
        egress=parts["egress"],
        ingress_deny=parts["ingressDeny"],
        egress_deny=parts["egressDeny"],
        labels=labels,
        description=description,
        spec=raw,
        enable_default_deny=default_deny,
        scope=scope,
    )


def _rule_labels(raw: Any, where: str) -> tuple[Label, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: labels must be a list")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            try:
                label = Label.parse(item, "unspec")
            except ValueError as exc:
                raise InvalidRequest(f"{where}: labels[{i}]: {exc}") from None
        elif isinstance(item, dict):
            _only(item, ("key", "value", "source"), f"{where}: labels[{i}]")
            if not isinstance(item.get("key"), str) or not item["key"]:
                raise InvalidRequest(f"{where}: labels[{i}].key is required")
            label = Label(str(item.get("source") or "unspec"), item["key"], str(item.get("value", "")))
        else:
            raise InvalidRequest(f"{where}: labels[{i}] must be an object or 'key=value'")
        out.append(label)
    return tuple(sorted(out))


def _peer_rule(raw: Any, where: str, egress: bool, deny: bool, scope: Scope = PLAIN, strict: bool = True) -> PeerRule:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: must be an object")
    keys = _PEER_KEYS[egress]
    allowed = tuple(keys.values())
    endpoints_key, requires_key, entities_key = keys["endpoints"], keys["requires"], keys["entities"]
    for key in raw:
        if key not in allowed and (key in NOT_YET or key.replace("from", "to", 1) in NOT_YET):
            raise InvalidRequest(f"{where}: {key}: {NOT_YET.get(key) or NOT_YET[key.replace('from', 'to', 1)]} "
                                 "are not supported yet")
    if not egress and ("toServices" in raw or "fromServices" in raw):
        raise InvalidRequest(f"{where}: {'toServices' if 'toServices' in raw else 'fromServices'}: services are "
                             "egress peers only (toServices in an egress entry), as in Cilium")
    _only(raw, allowed, where)
    endpoints_raw = raw.get(endpoints_key)
    endpoints = _selectors(endpoints_raw, f"{where}.{endpoints_key}", scope, entities_key)
    requires = _selectors(raw.get(requires_key), f"{where}.{requires_key}", scope, entities_key)
    if deny and requires:
        raise InvalidRequest(f"{where}: {requires_key} is not allowed in a deny rule")
    entities_raw = raw.get(entities_key)
    entities: tuple[str, ...] = ()
    if entities_raw is not None:
        if not isinstance(entities_raw, list):
            raise InvalidRequest(f"{where}.{entities_key}: must be a list")
        for e in entities_raw:
            if e not in ENTITIES:
                raise InvalidRequest(f"{where}.{entities_key}: unknown entity {e!r} "
                                     f"(known: {', '.join(ENTITIES)})")
        entities = tuple(entities_raw)
    cidr_raw, cidr_set_raw = raw.get(keys["cidr"]), raw.get(keys["cidr_set"])
    cidrs = _cidrs(cidr_raw, f"{where}.{keys['cidr']}") + _cidr_set(cidr_set_raw, f"{where}.{keys['cidr_set']}")
    services_raw = raw.get("toServices") if egress else None
    services = _services(services_raw, f"{where}.toServices", scope, deny)
    # As Cilium's sanitize: one kind of L3 peer per entry ("Combining X and Y is not supported yet").
    peer_keys = (endpoints_key, entities_key, keys["cidr"], keys["cidr_set"], *(("toServices",) if egress else ()))
    given = [k for k in peer_keys if raw.get(k) is not None]
    if len(given) > 1:
        raise InvalidRequest(f"{where}: combining {given[0]} and {given[1]} is not supported "
                             "(write them as two entries)")
    ports_raw = raw.get("toPorts")
    if ports_raw == [] and strict:
        raise InvalidRequest(f"{where}.toPorts: an empty list would mean every port and protocol (Cilium reads it "
                             "as if left out); leave it out for every port, or name the ports")
    ports = _ports(ports_raw, f"{where}.toPorts", deny, strict)
    # Cilium >= 1.15: an empty list of peers selects no peer (not, as an absent one, every peer)
    nobody = [] in (endpoints_raw, entities_raw, cidr_raw, cidr_set_raw, services_raw)
    return PeerRule(endpoints, requires, entities, ports, nobody, cidrs, services)


_PEER_KEYS = {egress: {"endpoints": f"{p}Endpoints", "requires": f"{p}Requires", "entities": f"{p}Entities",
                       "cidr": f"{p}CIDR", "cidr_set": f"{p}CIDRSet", "ports": "toPorts",
                       **({"services": "toServices"} if egress else {})}
              for egress, p in ((False, "from"), (True, "to"))}

# A service's name, as datapath.services.NAME (which this cannot import: that module imports the
# policy selectors); tests/unit/test_policy_services.py keeps the two equal.
SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")


def _services(raw: Any, where: str, scope: Scope, deny: bool) -> tuple[str, ...]:
    """toServices: `[{k8sService: {serviceName, namespace}}]`, the names of services whose backends
    are the peers. cellgate services have no namespace and no labels: a namespace other than
    `default` and k8sServiceSelector are refused, as is toServices in a deny (it could not hold
    before a new backend takes traffic through the service)."""
    if raw is None:
        return ()
    if deny:
        raise InvalidRequest(f"{where}: toServices is not supported in egressDeny: a service's backends change "
                             "under it, and a deny must never lag behind them; deny the backends with "
                             "toEndpoints or toCIDR")
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list of {{k8sService: {{serviceName: NAME}}}}")
    names = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{w}: must be an object with k8sService")
        if "k8sServiceSelector" in item:
            raise InvalidRequest(f"{w}.k8sServiceSelector: selecting services by their labels is not supported: "
                                 "cellgate services have no labels; name the service with "
                                 "k8sService: {serviceName: NAME}")
        _only(item, ("k8sService",), w)
        ref = item.get("k8sService")
        if not isinstance(ref, dict):
            raise InvalidRequest(f"{w}.k8sService: required, an object with serviceName (and namespace)")
        _only(ref, ("serviceName", "namespace"), f"{w}.k8sService")
        name = ref.get("serviceName")
        if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            raise InvalidRequest(f"{w}.k8sService.serviceName: {name!r} is not a service name (1-63 lower-case "
                                 "letters, digits, '.' or '-')")
        namespace = ref.get("namespace")
        if namespace is None or namespace == "":
            if scope.kind == CNP and scope.namespace != DEFAULT_NAMESPACE:
                raise InvalidRequest(f"{w}.k8sService: a {CNP} of namespace {scope.namespace!r} names a service "
                                     f"of its own namespace, and cellgate services are in no namespace but "
                                     f"{DEFAULT_NAMESPACE!r}: write namespace: {DEFAULT_NAMESPACE}")
        elif namespace != DEFAULT_NAMESPACE:
            raise InvalidRequest(f"{w}.k8sService.namespace: {namespace!r}: cellgate services have no namespace "
                                 f"(leave it out, or write {DEFAULT_NAMESPACE!r})")
        names.append(name)
    return tuple(dict.fromkeys(names))


def _cidrs(raw: Any, where: str) -> tuple[CidrSelector, ...]:
    """fromCIDR/toCIDR: a list of CIDRs (or bare addresses: their /32 or /128)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list of CIDRs")
    return tuple(dict.fromkeys(CidrSelector(parse_prefix(item, f"{where}[{i}]")) for i, item in enumerate(raw)))


def _cidr_set(raw: Any, where: str) -> tuple[CidrSelector, ...]:
    """fromCIDRSet/toCIDRSet: a list of {cidr, except: [...]}, every except inside its cidr (as
    Cilium's CIDRRule.sanitize; host bits are masked off as Cilium does)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list of {{cidr, except}} objects")
    out = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{w}: must be an object with cidr (and except)")
        for key in ("cidrGroupRef", "cidrGroupSelector"):
            if key in item:
                raise InvalidRequest(f"{w}.{key}: CIDR groups (CiliumCIDRGroup) are not supported; "
                                     "write the CIDRs in the rule")
        _only(item, ("cidr", "except"), w)
        if item.get("cidr") is None:
            raise InvalidRequest(f"{w}.cidr: required")
        cidr = parse_prefix(item["cidr"], f"{w}.cidr", address_ok=False)
        excepts_raw = item.get("except")
        if excepts_raw is None:
            excepts_raw = []
        if not isinstance(excepts_raw, list):
            raise InvalidRequest(f"{w}.except: must be a list of CIDRs")
        excepts = []
        for j, text in enumerate(excepts_raw):
            ex = parse_prefix(text, f"{w}.except[{j}]", address_ok=False)
            if ex.version != cidr.version or not ex.subnet_of(cidr):  # type: ignore[arg-type]
                raise InvalidRequest(f"{w}.except[{j}]: {ex} is not inside the cidr {cidr} "
                                     "(an except must be a part of its cidr)")
            excepts.append(ex)
        out.append(CidrSelector(cidr, tuple(dict.fromkeys(excepts))))
    return tuple(dict.fromkeys(out))


def _selectors(raw: Any, where: str, scope: Scope = PLAIN, entities: str = "fromEntities") -> tuple[Selector, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list of selectors")
    if not scope.kind:
        return tuple(parse_selector(s, f"{where}[{i}]") for i, s in enumerate(raw))
    return tuple(scope.peer(parse_selector(s, f"{where}[{i}]"), f"{where}[{i}]", entities)
                 for i, s in enumerate(raw))


def _ports(raw: Any, where: str, deny: bool = False, strict: bool = True) -> tuple[PortRange, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list")
    out: list[PortRange] = []
    for i, pr in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(pr, dict):
            raise InvalidRequest(f"{w}: must be an object")
        if "listener" in pr or "originatingTLS" in pr or "terminatingTLS" in pr or "serverNames" in pr:
            raise InvalidRequest(f"{w}: L7 listeners and TLS are not supported yet")
        _only(pr, ("ports", "rules"), w)
        l7 = _l7(pr.get("rules"), f"{w}.rules", deny, strict)
        ports = pr.get("ports")
        if not isinstance(ports, list) or not ports:
            raise InvalidRequest(f"{w}.ports: must be a non-empty list")
        if len(ports) > MAX_PORTS:
            raise InvalidRequest(f"{w}.ports: at most {MAX_PORTS} ports per rule")
        for j, p in enumerate(ports):
            out.extend(_port(p, f"{w}.ports[{j}]", l7))
    return tuple(out)


def _l7(raw: Any, where: str, deny: bool, strict: bool) -> L7Rules | None:
    """A toPorts entry's `rules` (datapath.policy.l7 has the language), attached to its ports."""
    if raw is None or (not raw and not strict):  # an older agent took a falsy `rules` as none
        return None
    if deny:
        raise InvalidRequest(f"{where}: L7 rules are not allowed in deny rules (as Cilium): a deny rule drops the "
                             "whole port")
    return parse_l7_rules(raw, where)


def _port(raw: Any, where: str, l7: L7Rules | None = None) -> list[PortRange]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: must be an object")
    _only(raw, ("port", "endPort", "protocol"), where)
    if raw.get("protocol") is not None and not isinstance(raw["protocol"], str):
        raise InvalidRequest(f"{where}.protocol: must be one of TCP, UDP, SCTP, ICMP, ICMPv6, ANY")
    proto_name = (raw.get("protocol") or "ANY").upper()
    if proto_name not in PROTOCOLS:
        raise InvalidRequest(f"{where}.protocol: must be one of TCP, UDP, SCTP, ICMP, ICMPv6, ANY")
    proto = PROTOCOLS[proto_name]
    port_raw = raw.get("port", 0)
    if isinstance(port_raw, bool) or not isinstance(port_raw, (int, str)):
        raise InvalidRequest(f"{where}.port: must be a number")
    if isinstance(port_raw, str):
        if not (port_raw.isascii() and port_raw.isdigit()):
            raise InvalidRequest(f"{where}.port: {port_raw!r} is not a port number (named ports are not supported)")
        port_raw = int(port_raw)
    limit = 255 if proto in (1, 58) else 65535
    if not 0 <= port_raw <= limit:
        raise InvalidRequest(f"{where}.port: must be between 1 and {limit}")
    end = raw.get("endPort")
    if end is None or end == 0:
        end = port_raw
    elif isinstance(end, bool) or not isinstance(end, int) or not port_raw <= end <= limit or port_raw == 0:
        raise InvalidRequest(f"{where}.endPort: must be between port ({port_raw}) and {limit}")
    if l7 is not None:  # as Cilium's PortRule.sanitize
        if proto != PROTOCOLS["TCP"]:
            given = "" if raw.get("protocol") else " (no protocol means ANY)"
            raise InvalidRequest(f"{where}: L7 rules need protocol TCP, not {proto_name}{given}; write protocol: TCP")
        if port_raw == 0:
            raise InvalidRequest(f"{where}: L7 rules need a port (port 0 means every port)")
        return [PortRange(proto, port_raw, end, l7)]
    if proto == 0 and port_raw:
        return [PortRange(p, port_raw, end) for p in PORTED]
    return [PortRange(proto, port_raw, end)]

