"""Policy use cases: identities of endpoints, the rule repository, and the policy map.

The Agent owns one PolicyState and calls it under the Agent's lock. Every change is
computed in full from pure code (datapath.policymap), diffed against what the kernel
holds, and applied additions first, removals last, so nothing is ever open in between.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from datapath import identity as ids
from datapath.errors import InvalidRequest
from datapath.identity import Identities
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint
from datapath.policy import Change, Repository, Rule
from datapath.policy.compile import ENFORCEMENT_MODES, Entries, PolicyKey, PolicyValue, compile_all, enforcement
from datapath.policy.trace import Party, TraceResult, trace
from datapath.ports import Kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    upserts: int
    deletes: int
    entries: int


class PolicyState:
    def __init__(self, identities: Identities, repository: Repository, kernel: Kernel, mode: str = "default") -> None:
        if mode not in ENFORCEMENT_MODES:
            raise InvalidRequest(f"enforcement must be one of {', '.join(ENFORCEMENT_MODES)}")
        self.identities = identities
        self.repository = repository
        self.kernel = kernel
        self.mode = mode
        self.applied: Entries = {}
        self.realized_revision = 0

    # -- computing --------------------------------------------------------------------------

    @staticmethod
    def subjects(endpoints: Iterable[Endpoint], extra: Mapping[int, LabelSet] | None = None) -> dict[int, LabelSet]:
        """Identities whose policy the datapath needs: every local endpoint's, and init."""
        out: dict[int, LabelSet] = {ids.INIT: ids.RESERVED_LABELS[ids.INIT]}
        for ep in endpoints:
            if ep.identity != ids.INIT:
                out[ep.identity] = ep.label_set
        out.update(extra or {})
        return out

    def desired(self, endpoints: Iterable[Endpoint], rules: list[Rule] | None = None,
                extra: Mapping[int, LabelSet] | None = None) -> Entries:
        if rules is None:
            _, rules = self.repository.snapshot()
        identities = self.identities.all()
        identities.update(extra or {})
        return compile_all(self.subjects(endpoints, extra), rules, identities, self.mode)

    # -- applying ---------------------------------------------------------------------------

    def load(self) -> None:
        """Start from what the (pinned) policy map holds, e.g. after a restart."""
        self.applied = self.kernel.policy_entries()

    def sync(self, endpoints: Iterable[Endpoint], rules: list[Rule] | None = None,
             extra: Mapping[int, LabelSet] | None = None, delete: bool = True) -> SyncReport:
        want = self.desired(endpoints, rules, extra)
        upserts = {k: v for k, v in want.items() if self.applied.get(k) != v}
        deletes = [k for k in self.applied if k not in want] if delete else []
        if upserts or deletes:
            try:
                self.kernel.policy_update(upserts, deletes)
            except Exception:
                # Part of the batch may be in: learn what the map holds, so that the next
                # sync (the caller's rollback) repairs it instead of trusting a stale view.
                try:
                    self.load()
                except Exception as exc:  # the original error is the one to report
                    log.error("cannot read the policy map back: %s", exc)
                raise
            self.applied.update(upserts)
            for key in deletes:
                del self.applied[key]
            log.info("policy map: %d entries written, %d removed (%d in force)", len(upserts), len(deletes),
                     len(self.applied))
        return SyncReport(len(upserts), len(deletes), len(self.applied))

    def import_rules(self, rules: Sequence[Rule], endpoints: Sequence[Endpoint]) -> int:
        """Add rules and enforce them; on a kernel error the repository keeps its old rules."""
        change = self.repository.plan_add(rules)
        revision = self._enforce(change, endpoints)
        log.info("policy revision %d: %d rules imported", revision, len(rules))
        return revision

    def delete_rules(self, labels: Sequence[Label] | None, endpoints: Sequence[Endpoint]) -> tuple[int, int]:
        change = self.repository.plan_delete(labels)  # raises NotFound before anything changes
        revision = self._enforce(change, endpoints)
        log.info("policy revision %d: %d rules deleted", revision, change.removed)
        return revision, change.removed

    def _enforce(self, change: Change, endpoints: Sequence[Endpoint]) -> int:
        """The maps first, then the repository; on any error both stay as the old rules say."""
        try:
            self.sync(endpoints, change.rules)
            revision = self.repository.commit(change)
        except Exception:
            self.sync(endpoints)  # put back what the old rules say
            raise
        self.realized_revision = revision
        return revision

    # -- views ------------------------------------------------------------------------------

    def enforcement_of(self, ep: Endpoint) -> dict[str, bool]:
        _, rules = self.repository.snapshot()
        enf = enforcement(ep.identity, ep.label_set if ep.identity != ids.INIT else ids.RESERVED_LABELS[ids.INIT],
                          rules, self.mode)
        return {"ingress": enf.ingress, "egress": enf.egress}

    def entries_of(self, identity: int) -> list[tuple[PolicyKey, PolicyValue]]:
        return sorted((k, v) for k, v in self.applied.items() if k.subject == identity)

    def labels_of(self, identity: int) -> list[str]:
        labels = self.identities.labels_of(identity)
        return sorted(str(lb) for lb in labels) if labels else []

    def trace(self, src: Party, dst: Party, proto: int, port: int) -> TraceResult:
        _, rules = self.repository.snapshot()
        return trace(rules, self.identities.all(), self.mode, src, dst, proto, port)
