"""Endpoint selectors (matchLabels, matchExpressions) and the namespace of an endpoint. Pure.

Imports only the standard library, datapath.errors and datapath.labels (no other policy module).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import InvalidRequest
from datapath.labels import ANY, RESERVED, Label, LabelSet

# -- namespaces --------------------------------------------------------------------------------

NAMESPACE_KEY = "io.kubernetes.pod.namespace"  # Cilium's k8s:io.kubernetes.pod.namespace, from any source
DEFAULT_NAMESPACE = "default"  # the namespace of an endpoint without that label
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels"


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
    labels = raw.get("matchLabels")
    labels = {} if labels is None else labels  # not `or`: [] and "" are no object
    if not isinstance(labels, dict):
        raise InvalidRequest(f"{where}.matchLabels: must be an object of key: value")
    for key, value in labels.items():
        if not isinstance(value, (str, int, bool)) or isinstance(value, bool):
            raise InvalidRequest(f"{where}.matchLabels.{key}: value must be a string")
        label = _selector_key(str(key), f"{where}.matchLabels")
        reqs.append(Requirement(label.source, label.key, "In", (str(value),)))
    exprs = raw.get("matchExpressions")
    exprs = [] if exprs is None else exprs
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
        values = expr.get("values")
        values = [] if values is None else values
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
    """A selector's key, `[source:]key`: a value (`=...`) in it is refused, not dropped."""
    if "=" in text:
        raise InvalidRequest(f"{where}: key {text[:80]!r} holds '=': a key has no value (give it as the value)")
    try:
        return Label.parse(text)
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


def _only(raw: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = _closest(key, allowed)
            raise InvalidRequest(f"{where}: unknown field {key!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


def _closest(key: str, allowed: Sequence[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    return found[0] if found else None
