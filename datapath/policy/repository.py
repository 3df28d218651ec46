"""The rules in force, with a revision, persisted whole through a DocumentStore. Pure; imports
parse and rules, never compile or trace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import InvalidRequest, NotFound, StateError
from datapath.labels import ANY, Label
from datapath.policy.parse import parse_rule
from datapath.policy.rules import Rule, Scope
from datapath.store import DocumentStore

log = logging.getLogger(__name__)


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
