"""The policy language (Cilium-compatible) parsed into frozen values, and the repository. Pure.

Parsing is strict: an unknown key, a bad port or an unsupported feature is an error that
names the rule and the field (`rule 3: ingress[0]: unknown field 'fromEndpoint'`), and a
failed import leaves the repository as it was. Input is already-decoded JSON/YAML data,
bounded in depth and size before anything else looks at it.

Never fail open: what cannot be enforced as written is refused with a message naming the
feature, and an endpoint selector (`{}` included) never selects a reserved identity (host,
world, init...) unless it names that `reserved:` label itself; entities name those.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import InvalidRequest, NotFound, StateError
from datapath.labels import ANY, RESERVED, Label, LabelSet
from ipam.store import DocumentStore

log = logging.getLogger(__name__)

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


# -- namespaces --------------------------------------------------------------------------------

NAMESPACE_KEY = "io.kubernetes.pod.namespace"  # Cilium's k8s:io.kubernetes.pod.namespace, from any source
DEFAULT_NAMESPACE = "default"  # the namespace of an endpoint without that label
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels"
CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"
_NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Kubernetes namespace (DNS-1123 label)


def is_reserved(labels: LabelSet) -> bool:
    """Labels of a reserved identity (host, world, init...), which is no endpoint."""
    return any(lb.source == RESERVED for lb in labels)


def namespaces_of(labels: LabelSet) -> list[str]:
    """The namespace of an endpoint: its label io.kubernetes.pod.namespace from any source (Docker
    `-l`, CNI K8S_POD_NAMESPACE, Mesos), else `default`. Reserved identities have none."""
    found = [lb.value for lb in labels if lb.key == NAMESPACE_KEY and lb.source != RESERVED]
    if found:
        return found
    return [] if is_reserved(labels) else [DEFAULT_NAMESPACE]


# -- selectors -------------------------------------------------------------------------------

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class Requirement:
    source: str
    key: str
    operator: str
    values: tuple[str, ...] = ()
    namespace: bool = False  # about the endpoint's namespace (CRD selectors): see namespaces_of

    def _found(self, labels: LabelSet) -> list[str]:
        if self.namespace:
            return namespaces_of(labels)
        return [lb.value for lb in labels if lb.key == self.key and self.source in (ANY, lb.source)]

    def matches(self, labels: LabelSet) -> bool:
        found = self._found(labels)
        if self.operator == "Exists":
            return bool(found)
        if self.operator == "DoesNotExist":
            return not found
        if self.operator == "In":
            return any(v in self.values for v in found)
        return not any(v in self.values for v in found)  # NotIn: absent keys match too


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()
    raw: Any = field(default=None, compare=False, repr=False)  # the decoded JSON, as in force
    # The reserved labels it names (`reserved:X` with In or Exists): only such a selector selects
    # reserved identities; any other, `{}` included, selects endpoints only.
    reserved: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        found: tuple[str, ...] = ()
        for r in self.requirements:  # a loop: a generator costs more for one or two requirements
            if r.source == RESERVED and r.operator in ("In", "Exists"):
                found += (r.key,)
        object.__setattr__(self, "reserved", found)

    @functools.cached_property
    def text(self) -> str:
        """Canonical JSON of the selector in force, for traces and errors (made when first shown:
        encoding every selector of a 1k-rule import costs more than parsing it)."""
        return json.dumps(self.raw or {}, sort_keys=True, separators=(",", ":"))


    def matches(self, labels: LabelSet) -> bool:
        if not all(r.matches(labels) for r in self.requirements):
            return False
        return bool(self.reserved) or not is_reserved(labels)

    @property
    def wildcard(self) -> bool:
        return not self.requirements


def parse_selector(raw: Any, where: str) -> Selector:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: a selector must be an object")
    _only(raw, ("matchLabels", "matchExpressions"), where)
    reqs: list[Requirement] = []
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise InvalidRequest(f"{where}.matchLabels: must be an object of key: value")
    for key, value in labels.items():
        if not isinstance(value, (str, int, bool)) or isinstance(value, bool):
            raise InvalidRequest(f"{where}.matchLabels.{key}: value must be a string")
        label = _selector_key(str(key), f"{where}.matchLabels")
        reqs.append(Requirement(label.source, label.key, "In", (str(value),)))
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise InvalidRequest(f"{where}.matchExpressions: must be a list")
    for i, expr in enumerate(exprs):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            raise InvalidRequest(f"{w}: must be an object")
        _only(expr, ("key", "operator", "values"), w)
        if not isinstance(expr.get("key"), str) or not expr["key"]:
            raise InvalidRequest(f"{w}.key: required")
        op = expr.get("operator")
        if op not in OPERATORS:
            raise InvalidRequest(f"{w}.operator: must be one of {', '.join(OPERATORS)}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"{w}.values: must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise InvalidRequest(f"{w}.values: {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise InvalidRequest(f"{w}.values: {op} takes no values")
        label = _selector_key(expr["key"], w)
        reqs.append(Requirement(label.source, label.key, op, tuple(values)))
    return Selector(tuple(reqs), raw)


def _selector_key(text: str, where: str) -> Label:
    try:
        return Label.parse(text)
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Scope:
    """Where a rule comes from: a plain rule list (kind ""), or a CiliumNetworkPolicy of a
    namespace, or a CiliumClusterwideNetworkPolicy."""

    kind: str = ""
    namespace: str = ""

    def subject(self, sel: Selector, where: str) -> Selector:
        """The endpointSelector in force: no reserved identity but init; a CNP's own namespace only."""
        if not self.kind and not sel.reserved:
            return sel
        for name in sel.reserved:
            if name != "init":
                raise InvalidRequest(f"{where}: selects reserved:{name}: {_UNENFORCED.get(name, _NOT_AN_ENDPOINT)}")
            if self.kind == CNP:
                raise InvalidRequest(f"{where}: a CiliumNetworkPolicy cannot select reserved:init (endpoints whose "
                                     "labels are not known yet have no namespace); use a "
                                     "CiliumClusterwideNetworkPolicy")
        if not self.kind:
            return sel
        sel = self._namespaced(sel, where)
        if self.kind == CNP:
            probe = frozenset({Label("k8s", NAMESPACE_KEY, self.namespace)})
            if not all(r.matches(probe) for r in sel.requirements if r.namespace):
                raise InvalidRequest(f"{where}: a CiliumNetworkPolicy of namespace {self.namespace!r} applies to "
                                     f"endpoints of namespace {self.namespace!r} only, and this selects another "
                                     "(use a CiliumClusterwideNetworkPolicy)")
            sel = self._in_namespace(sel)
        return sel

    def peer(self, sel: Selector, where: str, entities: str) -> Selector:
        """A fromEndpoints/toEndpoints/Requires selector in force: in a CNP, endpoints of its
        namespace unless it names a namespace itself (as Cilium's ParseToCiliumRule)."""
        if not self.kind:
            return sel
        if sel.reserved:
            raise InvalidRequest(f"{where}: selects reserved:{sel.reserved[0]}, but the endpoint selectors of a "
                                 f"{self.kind} select endpoints only; name reserved identities with {entities} "
                                 f"(e.g. {entities}: [{_ENTITY_OF.get(sel.reserved[0], 'host')}])")
        sel = self._namespaced(sel, where)
        if self.kind == CNP and not any(r.namespace for r in sel.requirements):
            sel = self._in_namespace(sel)
        return sel

    @staticmethod
    def _namespaced(sel: Selector, where: str) -> Selector:
        """Requirements on io.kubernetes.pod.namespace (any source, `k8s:` included) become
        requirements on the endpoint's namespace."""
        if not any(r.key == NAMESPACE_KEY or r.key.startswith(NAMESPACE_LABELS) for r in sel.requirements):
            return sel
        reqs = []
        for r in sel.requirements:
            if r.key.startswith(NAMESPACE_LABELS):
                raise InvalidRequest(f"{where}: selecting namespaces by their labels ({r.key}) is not supported: "
                                     "cellgate knows no namespace labels")
            reqs.append(dataclasses.replace(r, source=ANY, namespace=True) if r.key == NAMESPACE_KEY
                        and r.source != RESERVED else r)
        return Selector(tuple(reqs), sel.raw)

    def _in_namespace(self, sel: Selector) -> Selector:
        raw = dict(sel.raw or {})
        raw["matchLabels"] = {**(raw.get("matchLabels") or {}), f"k8s:{NAMESPACE_KEY}": self.namespace}
        req = Requirement(ANY, NAMESPACE_KEY, "In", (self.namespace,), namespace=True)
        return Selector((*sel.requirements, req), raw)


PLAIN = Scope()
_NOT_AN_ENDPOINT = "it is no endpoint and cellgate does not enforce policy for it (only endpoints and " \
                   "reserved:init can be a rule's subject)"
_UNENFORCED = {
    "host": "policy for the host itself (host policies) is not supported yet",
    "ingress": "there is no ingress proxy here (L7 policy is not supported yet)",
    "health": "cellgate has no health endpoint and does not enforce policy for it",
}
_ENTITY_OF = {"host": "host", "world": "world", "init": "init", "remote-node": "remote-node",
              "unmanaged": "unmanaged"}


# -- rules -----------------------------------------------------------------------------------

ENTITIES = ("host", "world", "all", "init", "cluster", "remote-node", "unmanaged")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58, "ANY": 0}
PORTED = (6, 17, 132)
MAX_PORTS = 40  # per port rule, as Cilium
NOT_YET = {
    "fromCIDR": "CIDR rules", "fromCIDRSet": "CIDR rules", "toCIDR": "CIDR rules", "toCIDRSet": "CIDR rules",
    "toServices": "service rules", "toFQDNs": "FQDN rules", "fromNodes": "node rules", "toNodes": "node rules",
    "icmps": "ICMP field rules (use toPorts with protocol ICMP and the type as port)",
    "fromGroups": "group rules", "toGroups": "group rules", "authentication": "authentication rules (mutual TLS)",
}


@dataclass(frozen=True)
class PortRange:
    protocol: int  # IPPROTO_*, 0 = any
    first: int  # 0 = every port (or every ICMP type)
    last: int

    def __str__(self) -> str:
        proto = next((k for k, v in PROTOCOLS.items() if v == self.protocol), str(self.protocol))
        if self.first == 0:
            return proto if self.protocol else "ANY"
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{ports}/{proto}"


@dataclass(frozen=True)
class PeerRule:
    """One entry of ingress/egress/ingressDeny/egressDeny."""

    endpoints: tuple[Selector, ...] = ()
    requires: tuple[Selector, ...] = ()
    entities: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()  # empty: every port and protocol
    nobody: bool = False  # an empty list of peers was given (`fromEndpoints: []`): it selects no peer

    @property
    def has_l3(self) -> bool:
        """Names its peers (maybe none). Without them, ports apply to any peer, and no ports means nothing."""
        return bool(self.endpoints or self.entities or self.nobody)


@dataclass(frozen=True)
class Rule:
    selector: Selector
    ingress: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    labels: tuple[Label, ...] = ()
    description: str = ""
    spec: Any = field(default=None, compare=False, repr=False)  # the rule as given (decoded JSON)
    id: int = 0  # assigned by the repository
    enable_default_deny: tuple[bool | None, bool | None] = (None, None)  # (ingress, egress); None = as Cilium
    scope: Scope = PLAIN  # a plain rule, or the CRD (and namespace) it came from

    def default_deny(self, egress: bool) -> bool:
        """Whether this rule puts its endpoints into default deny in a direction (Cilium's rule:
        yes if it has allow or deny entries there, unless enableDefaultDeny says otherwise)."""
        explicit = self.enable_default_deny[1 if egress else 0]
        has_rules = bool(self.egress or self.egress_deny) if egress else bool(self.ingress or self.ingress_deny)
        return has_rules if explicit is None else explicit and has_rules

    def numbered(self, number: int) -> Rule:
        """This rule under the repository's id: a shallow copy of its attributes (dataclasses.
        replace re-runs __init__, copy.copy goes through __reduce_ex__; either took a fifth of
        a 1k-rule import)."""
        twin = object.__new__(Rule)
        twin.__dict__.update(self.__dict__, id=number)
        return twin

    @property
    def kind(self) -> str:
        return self.scope.kind

    @property
    def namespace(self) -> str:
        return self.scope.namespace

    @property
    def document(self) -> Any:
        """What imports this rule again with the same meaning: the rule as given, inside its CRD
        (with its namespace) if it came from one. `policy get` shows this."""
        if not self.scope.kind:
            return self.spec
        metadata = {"namespace": self.scope.namespace} if self.scope.namespace else {}
        return {"apiVersion": "cilium.io/v2", "kind": self.scope.kind, "metadata": metadata, "spec": self.spec}

    @functools.cached_property
    def raw(self) -> str:
        """Canonical JSON of the rule as given (made on demand: only unlabelled rules need it)."""
        return json.dumps(self.document or {}, sort_keys=True, separators=(",", ":"))

    @property
    def name(self) -> str:
        if self.labels:
            return ",".join(f"{lb.key}={lb.value}" for lb in self.labels)
        return f"rule {self.id}"


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
        if not isinstance(namespace, str) or not _NAMESPACE_NAME.match(namespace):
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
    allowed = _PEER_KEYS[egress]
    endpoints_key, requires_key, entities_key, _ = allowed
    for key in raw:
        if key not in allowed and (key in NOT_YET or key.replace("from", "to", 1) in NOT_YET):
            raise InvalidRequest(f"{where}: {key}: {NOT_YET.get(key) or NOT_YET[key.replace('from', 'to', 1)]} "
                                 "are not supported yet")
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
    if endpoints_raw is not None and entities_raw is not None:
        raise InvalidRequest(f"{where}: combining {endpoints_key} and {entities_key} is not supported")
    ports_raw = raw.get("toPorts")
    if ports_raw == [] and strict:
        raise InvalidRequest(f"{where}.toPorts: an empty list would mean every port and protocol (Cilium reads it "
                             "as if left out); leave it out for every port, or name the ports")
    ports = _ports(ports_raw, f"{where}.toPorts")
    # Cilium >= 1.15: an empty list of peers selects no peer (not, as an absent one, every peer)
    nobody = endpoints_raw == [] or entities_raw == []
    return PeerRule(endpoints, requires, entities, ports, nobody)


_PEER_KEYS = {egress: (f"{p}Endpoints", f"{p}Requires", f"{p}Entities", "toPorts")
              for egress, p in ((False, "from"), (True, "to"))}


def _selectors(raw: Any, where: str, scope: Scope = PLAIN, entities: str = "fromEntities") -> tuple[Selector, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list of selectors")
    if not scope.kind:
        return tuple(parse_selector(s, f"{where}[{i}]") for i, s in enumerate(raw))
    return tuple(scope.peer(parse_selector(s, f"{where}[{i}]"), f"{where}[{i}]", entities)
                 for i, s in enumerate(raw))


def _ports(raw: Any, where: str) -> tuple[PortRange, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: must be a list")
    out: list[PortRange] = []
    for i, pr in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(pr, dict):
            raise InvalidRequest(f"{w}: must be an object")
        if pr.get("rules"):
            raise InvalidRequest(f"{w}.rules: L7 rules (http, kafka, dns) are not supported yet")
        if "listener" in pr or "originatingTLS" in pr or "terminatingTLS" in pr or "serverNames" in pr:
            raise InvalidRequest(f"{w}: L7 listeners and TLS are not supported yet")
        _only(pr, ("ports", "rules"), w)
        ports = pr.get("ports")
        if not isinstance(ports, list) or not ports:
            raise InvalidRequest(f"{w}.ports: must be a non-empty list")
        if len(ports) > MAX_PORTS:
            raise InvalidRequest(f"{w}.ports: at most {MAX_PORTS} ports per rule")
        for j, p in enumerate(ports):
            out.extend(_port(p, f"{w}.ports[{j}]"))
    return tuple(out)


def _port(raw: Any, where: str) -> list[PortRange]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: must be an object")
    _only(raw, ("port", "endPort", "protocol"), where)
    proto_name = str(raw.get("protocol") or "ANY").upper()
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
    if proto == 0 and port_raw:
        return [PortRange(p, port_raw, end) for p in PORTED]
    return [PortRange(proto, port_raw, end)]


def _only(raw: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = _closest(key, allowed)
            raise InvalidRequest(f"{where}: unknown field {key!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


def _closest(key: str, allowed: Sequence[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    return found[0] if found else None


# -- repository ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """Rules a repository would hold after an add or delete, planned on revision `base`."""

    rules: list[Rule]
    next_id: int
    base: int
    removed: int  # rules in force that the change drops (replaced or deleted)


@dataclass
class Repository:
    """The rules in force, with a revision that grows on every change. Persisted whole."""

    store: DocumentStore | None = None
    rules: list[Rule] = field(default_factory=list)
    revision: int = 0
    _next_id: int = 1
    _lock: threading.RLock = field(default_factory=threading.RLock)

    KEY = "policy"

    def __post_init__(self) -> None:
        if self.store is None:
            return
        for _, doc in self.store.load():
            if doc.get("kind") != "policy":
                continue
            self.revision = int(doc.get("revision", 0))
            self._next_id = int(doc.get("next_id", 1))
            rules = []
            for item in doc.get("rules", []):
                spec = item["spec"] if "spec" in item else json.loads(item["raw"])  # "raw" (a JSON string): version 1
                rules.append(_stored_rule(spec, item).numbered(int(item["id"])))
            self.rules = rules

    def _persist(self, rules: list[Rule], revision: int, next_id: int) -> None:
        if self.store is not None:
            self.store.put(self.KEY, {
                "version": 2, "kind": "policy", "revision": revision, "next_id": next_id,
                "rules": [{"id": r.id, "spec": r.spec, **({"kind": r.kind, "namespace": r.namespace} if r.kind else {})}
                          for r in rules],
            })

    def snapshot(self) -> tuple[int, list[Rule]]:
        with self._lock:
            return self.revision, list(self.rules)

    def plan_add(self, new: Iterable[Rule]) -> Change:
        """The rules after adding `new`: a rule with the same labels as one in force replaces
        it, and an identical unlabelled rule is not added twice. Changes nothing yet."""
        with self._lock:
            new = list(new)
            # Only rules already in force are replaced: rules of one import never replace each
            # other (several rules may share labels, e.g. the specs of one CRD).
            replaced = {rule.labels for rule in new if rule.labels}
            kept = [r for r in self.rules if r.labels not in replaced]
            rules = list(kept)
            unlabelled = {r.raw for r in rules if not r.labels}
            next_id = self._next_id
            for rule in new:
                if not rule.labels:
                    if rule.raw in unlabelled:
                        continue
                    unlabelled.add(rule.raw)
                rules.append(rule.numbered(next_id))
                next_id += 1
            return Change(rules, next_id, self.revision, len(self.rules) - len(kept))

    def plan_delete(self, labels: Sequence[Label] | None) -> Change:
        """The rules after deleting those whose labels include all of `labels` (None: every
        rule); NotFound if none has them. Changes nothing yet."""
        if labels is not None and not labels:
            raise InvalidRequest("give at least one label to delete by (deleting every rule is explicit)")
        with self._lock:
            if labels is None:
                keep: list[Rule] = []
            else:
                wanted = set(labels)
                keep = [r for r in self.rules if not wanted <= _label_match_set(r.labels, wanted)]
            removed = len(self.rules) - len(keep)
            if labels is not None and removed == 0:
                raise NotFound("no rule has labels " + ", ".join(f"{lb.key}={lb.value}" for lb in labels))
            return Change(keep, self._next_id, self.revision, removed)

    def commit(self, change: Change) -> int:
        """Persist and adopt a planned change; returns the new revision."""
        with self._lock:
            if change.base != self.revision:
                raise StateError(f"policy changed meanwhile (revision {self.revision}, "
                                 f"planned on {change.base}); try again")
            revision = self.revision + 1
            self._persist(change.rules, revision, change.next_id)
            self.rules, self.revision, self._next_id = change.rules, revision, change.next_id
            return revision

    def add(self, new: Iterable[Rule]) -> int:
        return self.commit(self.plan_add(new))

    def delete(self, labels: Sequence[Label] | None) -> tuple[int, int]:
        """Delete rules by labels (see plan_delete); returns (revision, rules removed)."""
        change = self.plan_delete(labels)
        return self.commit(change), change.removed

    def select(self, labels: Sequence[Label] | None) -> list[Rule]:
        with self._lock:
            if not labels:
                return list(self.rules)
            wanted = set(labels)
            return [r for r in self.rules if wanted <= _label_match_set(r.labels, wanted)]


def _stored_rule(spec: Any, item: Mapping[str, Any]) -> Rule:
    """A rule as persisted, with the scope of the CRD it came from (rules stored before scopes were
    kept have none: they keep the meaning of plain rules they were enforced with)."""
    where = f"stored rule {item['id']}"
    scope = Scope(str(item.get("kind") or ""), str(item.get("namespace") or ""))
    try:
        return parse_rule(spec, where, scope)
    except InvalidRequest as exc:
        log.warning("%s would be refused today (%s); it stays in force as it was accepted", where, exc)
        return parse_rule(spec, where, scope, strict=False)


def _label_match_set(rule_labels: Iterable[Label], wanted: set[Label]) -> set[Label]:
    """Rule labels as they compare with query labels (a query without source matches any)."""
    out = set()
    for lb in rule_labels:
        out.add(lb)
        for w in wanted:
            if w.source in (ANY, "unspec") and w.key == lb.key and w.value == lb.value:
                out.add(w)
    return out
