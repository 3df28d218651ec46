"""Policy use cases: identities of endpoints, CIDR identities, the rule repository, and the policy map.

The Agent owns one PolicyState and calls it under the Agent's lock. Every change is
computed in full from pure code (datapath.policy.compile), diffed against what the kernel
holds, and applied additions first, removals last, so nothing is ever open in between.

CIDR rules: every prefix the rules name has a node-local identity (datapath.cidr) and an ipcache
entry. A change of rules allocates the new prefixes' identities, writes their policy entries, then
their ipcache entries, then switches the rules; prefixes no rule names any more lose their ipcache
entry first, then their identity and its entries. So the ipcache always holds every prefix the rules
in force name, which is what makes the longest-prefix identity of an address decide exactly.

Services (toServices): the Agent hands over what each service balances to (set_services) after
every change of its services. A selector service's peers are the endpoints its selector matches; an
address service's backends are CIDR prefixes of their own (/32, /128), which follow the same order as
a rule's CIDRs, so a change of backends never leaves a backend address judged more openly. A name
that names no service allows nothing until the service exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from datapath import identity as ids
from datapath import plan
from datapath.cidr import CidrIdentities, IPNetwork
from datapath.errors import CellgateError, InvalidRequest
from datapath.identity import Identities
from datapath.labels import Label, LabelSet
from datapath.model import Endpoint
from datapath.policy import Change, Repository, Rule
from datapath.policy.compile import (
    ENFORCEMENT_MODES,
    Entries,
    PolicyKey,
    PolicyValue,
    compile_all,
    enforcement,
    l7_kind_conflicts,
)
from datapath.policy.rules import named_prefixes, named_services
from datapath.policy.trace import L7Request, Party, TraceResult, trace
from datapath.ports import Kernel
from datapath.services import ServiceTarget
from datapath.store import MemoryStore
from plugin import failpoints
from plugin.service.l7filters import FilterTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    upserts: int
    deletes: int
    entries: int


Converge = Callable[[Iterable[plan.Key]], None]  # make the kernel match the desired state for these keys
T = TypeVar("T")


class PolicyState:
    def __init__(self, identities: Identities, repository: Repository, kernel: Kernel, mode: str = "default",
                 cidrs: CidrIdentities | None = None, filters: FilterTable | None = None) -> None:
        if mode not in ENFORCEMENT_MODES:
            raise InvalidRequest(f"enforcement must be one of {', '.join(ENFORCEMENT_MODES)}")
        self.identities = identities
        self.repository = repository
        self.kernel = kernel
        self.mode = mode
        self.applied: Entries = {}
        self.realized_revision = 0
        self.cidrs = cidrs if cidrs is not None else CidrIdentities(MemoryStore())
        self.filters = filters if filters is not None else FilterTable()  # numbered L7 rules, for the proxy
        self.services: dict[str, ServiceTarget] = {}  # what toServices names stand for (set_services)
        # Prefixes with an identity but no ipcache entry (yet, or any more) while rules change.
        self._unpublished: set[IPNetwork] = set()
        # Exactly the prefixes the stored rules name (a crash between the steps of a change may
        # have left one more or one less); the restore writes entries and the ipcache from here.
        _, rules = repository.snapshot()
        wanted = named_prefixes(rules)
        self.cidrs.acquire(wanted)
        self.cidrs.release([p for p in self.cidrs.prefixes() if p not in wanted])

    # -- identities -------------------------------------------------------------------------

    def all_identities(self) -> dict[int, LabelSet]:
        """Every identity a peer can have here: endpoints', reserved, the cluster's, CIDR ones."""
        out = self.identities.all()
        out.update(self.cidrs.all())
        return out

    def cidr_entries(self) -> set[plan.IpcacheEntry]:
        """The ipcache entries of the CIDR identities that are published."""
        return {plan.IpcacheEntry(prefix=p, identity=n) for p, n in self.cidrs.prefixes().items()
                if p not in self._unpublished}

    def with_cidr_entries(self, objs: set[plan.KernelObject]) -> set[plan.KernelObject]:
        """A desired state plus the CIDR ipcache entries; an address or prefix that has an entry of
        its own already (host address, remote endpoint, a peer node's range) keeps it."""
        entries = self.cidr_entries()
        if not entries:
            return objs
        taken = {o.key for o in objs if isinstance(o, plan.IpcacheEntry)}
        return objs | {e for e in entries if e.key not in taken}

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
                extra: Mapping[int, LabelSet] | None = None,
                services: Mapping[str, ServiceTarget] | None = None) -> Entries:
        if rules is None:
            _, rules = self.repository.snapshot()
        identities = self.all_identities()
        identities.update(extra or {})
        return compile_all(self.subjects(endpoints, extra), rules, identities, self.mode,
                           self.services if services is None else services)

    # -- applying ---------------------------------------------------------------------------

    def load(self) -> None:
        """Start from what the (pinned) policy map holds, e.g. after a restart."""
        self.applied = self.kernel.policy_entries()

    def sync(self, endpoints: Iterable[Endpoint], rules: list[Rule] | None = None,
             extra: Mapping[int, LabelSet] | None = None, delete: bool = True,
             services: Mapping[str, ServiceTarget] | None = None) -> SyncReport:
        want = self.filters.number(self.desired(endpoints, rules, extra, services))
        upserts = {k: v for k, v in want.items() if self.applied.get(k) != v}
        deletes = [k for k in self.applied if k not in want] if delete else []
        if any(v.l7 for v in upserts.values()):
            self.filters.publish()  # the proxy knows a filter before any entry names it
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
            if delete and self.filters.retire({v.l7 for v in self.applied.values() if v.l7}):
                self.filters.publish()
            log.info("policy map: %d entries written, %d removed (%d in force)", len(upserts), len(deletes),
                     len(self.applied))
        return SyncReport(len(upserts), len(deletes), len(self.applied))

    def import_rules(self, rules: Sequence[Rule], endpoints: Sequence[Endpoint],
                     converge: Converge | None = None) -> int:
        """Add rules and enforce them; on a kernel error the repository keeps its old rules.
        `converge` writes the ipcache (the Agent's); without it, CIDR prefixes get identities
        and policy entries but no ipcache entries (nothing has that address then)."""
        change = self.repository.plan_add(rules)
        conflict = l7_kind_conflicts(change.rules)
        if conflict:
            raise InvalidRequest(conflict)
        revision = self._enforce(change, endpoints, converge)
        failpoints.hit("policy.import.revision_bumped")  # enforced, persisted, realized; not replied
        log.info("policy revision %d: %d rules imported", revision, len(rules))
        return revision

    def delete_rules(self, labels: Sequence[Label] | None, endpoints: Sequence[Endpoint],
                     converge: Converge | None = None) -> tuple[int, int]:
        change = self.repository.plan_delete(labels)  # raises NotFound before anything changes
        revision = self._enforce(change, endpoints, converge)
        log.info("policy revision %d: %d rules deleted", revision, change.removed)
        return revision, change.removed

    def set_services(self, targets: Iterable[ServiceTarget], endpoints: Sequence[Endpoint],
                     converge: Converge | None = None) -> bool:
        """What every service balances to now (all of them, by name: a name left out is a
        service that is gone). Enforced at once for the rules that name a changed service, in
        the order of a rule change; on an error the old targets stay in force (and the next
        call tries again). True if the policy map was recomputed."""
        new = {t.name: t for t in targets}
        if new == self.services:
            return False
        _, rules = self.repository.snapshot()
        named = named_services(rules)
        if all(new.get(n) == self.services.get(n) for n in named):
            self.services = new  # no rule in force names a service that changed
            return False

        changed = sorted(n for n in named if new.get(n) != self.services.get(n))

        def adopt() -> None:
            self.services = new

        self._transition(rules, new, endpoints, converge, adopt)
        log.info("policy: services %s changed, their toServices peers follow", ", ".join(changed))
        return True

    def adopt_services(self, targets: Iterable[ServiceTarget]) -> None:
        """At restore, before its first sync: the services as stored, and the CIDR identities of
        the backends the rules name. Writes nothing: the restore's syncs and its ipcache write
        (with_cidr_entries) enforce them in its own order."""
        self.services = {t.name: t for t in targets}
        _, rules = self.repository.snapshot()
        self.cidrs.acquire(named_prefixes(rules, self.services))

    def _enforce(self, change: Change, endpoints: Sequence[Endpoint], converge: Converge | None = None) -> int:
        """The maps first, then the repository; on any error both stay as the old rules say."""
        revision = self._transition(change.rules, self.services, endpoints, converge,
                                    lambda: self.repository.commit(change))
        self.realized_revision = revision
        return revision

    def _transition(self, rules: list[Rule], services: Mapping[str, ServiceTarget], endpoints: Sequence[Endpoint],
                    converge: Converge | None, adopt: Callable[[], T]) -> T:
        """Enforce `rules` with `services` in the maps, then `adopt` them (commit); returns what
        adopt returns. On any error the maps stay as the rules and services in force say.

        New CIDR prefixes (rules' and services' backends): identity, its entries (under what is in
        force), ipcache entry, then the new entries. Prefixes nothing names any more: ipcache entry
        out, then identity and entries.
        """
        wanted = named_prefixes(rules, services)
        added = self.cidrs.acquire(wanted)
        try:
            if added:
                self._unpublished.update(added)
                self.sync(endpoints, delete=False)  # the new identities' entries, under what is in force
                self._unpublished.difference_update(added)
                self._publish(added, converge)
            self.sync(endpoints, rules, services=services)
            failpoints.hit("policy.change.maps_written")  # the maps enforce the new rules; not persisted
            result = adopt()
        except Exception:
            self._rollback(added, endpoints, converge)
            raise
        failpoints.hit("policy.change.persisted")  # committed; the realized revision not bumped yet
        gone = [p for p in self.cidrs.prefixes() if p not in wanted]
        if gone:
            self._withdraw(gone, endpoints, converge)
        return result

    def _publish(self, prefixes: Iterable[IPNetwork], converge: Converge | None) -> None:
        if converge is not None:
            converge({("ipcache", str(p)) for p in prefixes})

    def _rollback(self, added: list[IPNetwork], endpoints: Sequence[Endpoint], converge: Converge | None) -> None:
        """Put back what the old rules say: their entries, then the new prefixes gone again. What
        cannot be undone stays as an extra prefix with its entries, which decides as its parents."""
        try:
            self.sync(endpoints)
        except CellgateError as exc:  # the original error is the one to report
            log.error("cannot put the policy entries of the old rules back: %s", exc)
        if added:
            self._withdraw(added, endpoints, converge)

    def _withdraw(self, prefixes: list[IPNetwork], endpoints: Sequence[Endpoint], converge: Converge | None) -> None:
        """Prefixes no rule in force names: ipcache entries out first, then the identities and their
        entries. A failure leaves them in place, which is harmless (an extra prefix decides as its parents)."""
        self._unpublished.update(prefixes)
        try:
            self._publish(prefixes, converge)
        except CellgateError as exc:
            self._unpublished.difference_update(prefixes)
            log.error("cannot remove the ipcache entries of %s (kept): %s", ", ".join(map(str, prefixes)), exc)
            return
        self.cidrs.release(prefixes)
        self._unpublished.difference_update(prefixes)
        try:
            self.sync(endpoints)
        except CellgateError as exc:
            log.error("cannot remove the policy entries of released CIDR identities: %s", exc)

    # -- views ------------------------------------------------------------------------------

    def enforcement_of(self, ep: Endpoint) -> dict[str, bool]:
        _, rules = self.repository.snapshot()
        enf = enforcement(ep.identity, ep.label_set if ep.identity != ids.INIT else ids.RESERVED_LABELS[ids.INIT],
                          rules, self.mode)
        return {"ingress": enf.ingress, "egress": enf.egress}

    def entries_of(self, identity: int) -> list[tuple[PolicyKey, PolicyValue]]:
        return sorted((k, v) for k, v in self.applied.items() if k.subject == identity)

    def identity_labels(self, identity: int) -> LabelSet | None:
        """The labels of any identity known here, CIDR ones included."""
        labels = self.identities.labels_of(identity)
        return labels if labels is not None else self.cidrs.labels_of(identity)

    def labels_of(self, identity: int) -> list[str]:
        labels = self.identity_labels(identity)
        return sorted(str(lb) for lb in labels) if labels else []

    def trace(self, src: Party, dst: Party, proto: int, port: int, request: L7Request | None = None) -> TraceResult:
        _, rules = self.repository.snapshot()
        return trace(rules, self.all_identities(), self.mode, src, dst, proto, port, request, self.services)

    def preview(self, new: Sequence[Rule], cases: Sequence[tuple[Party, Party, int, int, L7Request | None]]) -> \
            list[tuple[bool, bool]]:
        """(allowed now, allowed once `new` is imported) for each case; changes nothing."""
        _, before = self.repository.snapshot()
        after = self.repository.plan_add(new).rules
        conflict = l7_kind_conflicts(after)
        if conflict:
            raise InvalidRequest(conflict)
        identities = self.all_identities()
        return [(trace(before, identities, self.mode, *c, self.services).allowed,
                 trace(after, identities, self.mode, *c, self.services).allowed) for c in cases]
