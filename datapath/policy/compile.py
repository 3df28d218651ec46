"""Compile policy rules into policy-map entries, and decide a packet exactly as the kernel does.
Pure; imports the rules and selectors, never parse, the repository or trace. (Was datapath.policymap.)

The kernel map is an LPM trie keyed by (subject, peer, direction, protocol, port
prefix); the datapath looks up the peer's identity and the wildcard peer (0) and takes
deny over allow, allow over nothing. `decide` below is that same algorithm, so
`policy trace` and the tests can predict the datapath exactly.

Wildcards are single entries: "port 80 from anyone" (`toPorts` without peers) and the entity
`all` are one key with peer 0, never one key per identity. Endpoint selectors enumerate the
identities they match, `{}` too: it means every endpoint, never the host or world, which peer
0 would also admit.

`toServices` peers come from `services` (name -> ServicePeer): a service's selector is an endpoint
selector, its backend addresses are /32 and /128 CIDR peers; a name not there allows nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from datapath import identity as ids
from datapath.cidr import CidrSelector, is_cidr_identity
from datapath.labels import LabelSet
from datapath.policy.l7 import Grant, L7Filter
from datapath.policy.rules import NO_SERVICES, PeerRule, PortRange, Rule, ServicePeers
from datapath.policy.selectors import Selector, is_reserved, namespaces_of

ENFORCEMENT_MODES = ("default", "always", "never")


class PolicyKey(NamedTuple):
    """A policy-map key. A tuple: compile, diffs and the exact verdicts hash and build hundreds
    of thousands of them, which a frozen dataclass does several times slower."""

    subject: int
    egress: bool
    peer: int  # identity, 0 = any
    proto: int  # IPPROTO_*; ignored when any_proto
    port: int  # port, or ICMP type; only its first port_bits bits count
    port_bits: int = 0
    any_proto: bool = False

    @property
    def prefixlen(self) -> int:
        """Bits of the 96-bit LPM data (subject, peer, direction, protocol, port) that count."""
        return 72 if self.any_proto else 80 + self.port_bits

    def covers(self, other: PolicyKey) -> bool:
        """Whether every packet matching `other` also matches this key (same subject/peer/direction)."""
        if (self.subject, self.egress, self.peer) != (other.subject, other.egress, other.peer):
            return False
        if self.any_proto:
            return True
        if other.any_proto or self.proto != other.proto or self.port_bits > other.port_bits:
            return False
        shift = 16 - self.port_bits
        return (self.port >> shift) == (other.port >> shift) if self.port_bits else True

    def describe(self) -> str:
        peer = "any" if self.peer == ids.ANY else str(self.peer)
        if self.any_proto:
            what = "any"
        elif self.port_bits == 0:
            what = _proto_name(self.proto)
        elif self.port_bits == 16:
            what = f"{self.port}/{_proto_name(self.proto)}"
        else:
            last = self.port | ((1 << (16 - self.port_bits)) - 1)
            what = f"{self.port}-{last}/{_proto_name(self.proto)}"
        return f"{'egress' if self.egress else 'ingress'} {peer} {what}"


@dataclass(frozen=True)
class PolicyValue:
    deny: bool
    rule: int  # rule id; 0 = default (not enforced)
    l7: int = 0  # the L7 filter's id in the kernel (0 = none); the service numbers `filter`
    filter: L7Filter | None = field(default=None, compare=False)  # the merged L7 rules (compile's output)


Entries = dict[PolicyKey, PolicyValue]


def _proto_name(proto: int) -> str:
    return {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}.get(proto, str(proto))


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """The fewest (port, significant bits) blocks that cover first..last exactly."""
    if first == 0:
        return [(0, 0)]
    out = []
    start = first
    while start <= last:
        size = start & -start if start else 1 << 16
        while start + size - 1 > last:
            size >>= 1
        out.append((start, 16 - size.bit_length() + 1))
        start += size
    return out


# -- compile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enforcement:
    ingress: bool
    egress: bool


class LabelIndex:
    """Identities (or subjects) by label `key=value`, source ignored, and by namespace: a
    pre-filter for selectors.

    `matching` returns exactly the numbers whose labels the selector matches, in O(candidates)
    instead of O(all): an `In` requirement can only hold for labels carrying one of its values,
    so the smallest such candidate set is checked with `Selector.matches`, which decides. The
    answer for a selector is kept, as every subject of a rule asks for the same peers.
    """

    def __init__(self, items: Mapping[int, LabelSet]) -> None:
        self.items = items
        self._by_pair: dict[tuple[str, str], set[int]] = {}
        self._by_namespace: dict[str, set[int]] = {}
        self._known: dict[Selector, list[int]] = {}
        for number, labels in items.items():
            for lb in labels:
                self._by_pair.setdefault((lb.key, lb.value), set()).add(number)
            for ns in namespaces_of(labels):
                self._by_namespace.setdefault(ns, set()).add(number)

    def with_label(self, key: str, value: str = "") -> set[int]:
        """The numbers whose labels include `key=value` (of any source)."""
        return self._by_pair.get((key, value), set())

    def matching(self, selector: Selector) -> list[int]:
        known = self._known.get(selector)  # equal selectors (by their requirements) select alike
        if known is not None:
            return known
        best: set[int] | None = None
        for req in selector.requirements:
            if req.operator != "In":
                continue
            found: set[int] = set()
            for value in req.values:
                if req.namespace:
                    found |= self._by_namespace.get(value, set())
                else:
                    found |= self._by_pair.get((req.key, value), set())
            if best is None or len(found) < len(best):
                best = found
        candidates = self.items if best is None else best
        out = [n for n in candidates if selector.matches(self.items[n])]
        self._known[selector] = out
        return out


def enforcement(labels_number: int, labels: LabelSet, rules: Iterable[Rule], mode: str,
                selected: list[Rule] | None = None) -> Enforcement:
    """Whether a subject is default-deny in each direction (`selected`: its rules, if known)."""
    if mode == "never":
        return Enforcement(False, False)
    if mode == "always":
        return Enforcement(True, True)
    rules = list(rules)
    if labels_number == ids.INIT and rules:
        return Enforcement(True, True)  # labels not known yet: closed until they are
    if selected is None:
        selected = [r for r in rules if r.selector.matches(labels)]
    return Enforcement(any(r.default_deny(egress=False) for r in selected),
                       any(r.default_deny(egress=True) for r in selected))


def service_cidrs(pr: PeerRule, services: ServicePeers) -> tuple[CidrSelector, ...]:
    """The CIDR peers of an entry's services that balance to addresses: one per backend address."""
    out: list[CidrSelector] = []
    for name in pr.services:
        target = services.get(name)
        if target is not None:
            out.extend(CidrSelector(p) for p in target.prefixes)
    return tuple(out)


def service_selectors(pr: PeerRule, services: ServicePeers) -> tuple[Selector, ...]:
    """The selectors of an entry's services that select their backends by labels."""
    out = []
    for name in pr.services:
        target = services.get(name)
        if target is not None and target.selector is not None:
            out.append(target.selector)
    return tuple(out)


def selects_backend(selector: Selector, labels: LabelSet) -> bool:
    """A service selector picks endpoints only (the balancer resolves it against endpoints), so
    it never matches a reserved or CIDR identity, whatever labels it names."""
    return not is_reserved(labels) and selector.matches(labels)


def _peers(pr: PeerRule, identities: Mapping[int, LabelSet], index: LabelIndex | None = None,
           services: ServicePeers = NO_SERVICES) -> set[int]:
    if pr.nobody:
        return set()  # an empty list of peers: nobody (Cilium >= 1.15)
    peers: set[int] = set()
    for sel in pr.endpoints:  # endpoints only, `{}` included (see Selector.matches)
        if index is not None:
            peers.update(index.matching(sel))
        else:
            peers.update(n for n, labels in identities.items() if sel.matches(labels))
    cidrs = pr.cidrs
    if pr.services:  # toServices: their selectors' endpoints, their backend addresses' CIDR identities
        for sel in service_selectors(pr, services):
            matched = index.matching(sel) if index is not None else identities
            peers.update(n for n in matched if selects_backend(sel, identities[n]))
        cidrs += service_cidrs(pr, services)
    for cidr in cidrs:  # the CIDR identities of prefixes inside the cidr and outside its excepts
        candidates = index.with_label(str(cidr.cidr)) if index is not None else identities
        peers.update(n for n in candidates if is_cidr_identity(n) and cidr.matches(identities[n]))
    for entity in pr.entities:
        if entity == "all":
            return {ids.ANY}
        if entity == "cluster":  # everything but the world: neither world nor a CIDR identity
            peers.update(n for n in identities if n != ids.WORLD and not is_cidr_identity(n))
        elif entity == "world":  # addresses outside the cluster: world, and every CIDR identity
            peers.add(ids.WORLD)
            peers.update(n for n in identities if is_cidr_identity(n))
        else:
            peers.add({"host": ids.HOST, "init": ids.INIT,
                       "remote-node": ids.REMOTE_NODE, "unmanaged": ids.UNMANAGED}[entity])
    if not pr.has_l3 and pr.ports:
        return {ids.ANY}
    return peers


Block = tuple[int, int, int, bool, Any]  # protocol, port, prefix bits, any protocol, L7 rules or None


@functools.lru_cache(maxsize=4096)
def _blocks(ports: tuple[PortRange, ...]) -> tuple[Block, ...]:
    """(protocol, port, prefix bits, any protocol, L7 rules) of the keys that cover `ports`,
    worked out once for all the peers of an entry."""
    if not ports:
        return ((0, 0, 0, True, None),)
    out: list[Block] = []
    for pr in ports:
        l7 = getattr(pr, "l7", None)
        if pr.protocol == 0:
            out.append((0, 0, 0, True, l7))
            continue
        out.extend((pr.protocol, port, bits, False, l7) for port, bits in port_prefixes(pr.first, pr.last))
    return tuple(out)


def _keys(subject: int, egress: bool, peer: int, ports: tuple[PortRange, ...]) -> list[tuple[PolicyKey, Any]]:
    return [(PolicyKey(subject, egress, peer, proto, port, bits, any_proto), l7)
            for proto, port, bits, any_proto, l7 in _blocks(ports)]


# -- L7: the rules of every allow that covers an entry ------------------------------------------


def _grant(rule: Rule, l7: Any) -> Grant:
    return Grant(rule.id, rule.name, http=tuple(l7.http), kafka=tuple(l7.kafka))


def _covers_ports(wide: PolicyKey, key: PolicyKey) -> bool:
    """Whether `wide`'s protocol and port block hold every packet of `key`'s (peers not compared:
    a wildcard peer's allow covers the entries of every peer)."""
    if wide.peer != key.peer:
        wide = PolicyKey(wide.subject, wide.egress, key.peer, wide.proto, wide.port, wide.port_bits, wide.any_proto)
    return wide.covers(key)


def _split_under_wildcards(entries: Entries, grants: dict[PolicyKey, list[Grant] | None],
                           by_group: dict[tuple[int, bool, int], list[PolicyKey]]) -> None:
    """A wildcard-peer allow on a block inside a peer's wider L7 allow: the kernel takes the peer's
    own entry first, which alone would hide the wildcard's rules from that peer. The peer gets an
    entry of the wildcard's block too, whose filter then merges both (none if the wildcard is
    L4-only), unless a deny of the peer holds that block."""
    denies: dict[tuple[int, bool, int], list[PolicyKey]] | None = None
    for (subject, egress, peer), keys in list(by_group.items()):
        wild = by_group.get((subject, egress, ids.ANY), [])
        if peer == ids.ANY or not wild or not any(grants.get(k) for k in keys):
            continue
        for w in list(wild):
            if w.any_proto:
                continue  # it covers every entry of the peer: a covering allow, no split needed
            twin = PolicyKey(subject, egress, peer, w.proto, w.port, w.port_bits)
            if twin in entries or not any(grants.get(k) and k.covers(twin) for k in keys):
                continue  # the peer has an entry of that very block, or no L7 allow around it
            if denies is None:
                denies = {}
                for key, value in entries.items():
                    if value.deny:
                        denies.setdefault((key.subject, key.egress, key.peer), []).append(key)
            hits = [k for k in keys + denies.get((subject, egress, peer), []) if k.covers(twin)]
            best = max(hits, key=lambda k: (not k.any_proto, k.port_bits))  # what the LPM lookup takes
            if entries[best].deny or not grants.get(best):
                continue  # denied, or L4-only there: every request passes anyway
            entries[twin] = PolicyValue(False, entries[best].rule)
            grants[twin] = list(grants[best] or ())
            keys.append(twin)


def _l7_filters(entries: Entries, grants: dict[PolicyKey, list[Grant] | None]) -> None:
    """Give every allow entry with L7 rules its filter: the grants of every allow that covers the
    entry's traffic (the same peer or any peer, the same or a wider port block), as Cilium merges
    the L7 rules of all selectors of a port. An allow without L7 rules among them allows every
    request: no filter, no redirect. Mixed protocols (http and kafka on one entry) deny every
    request (fail closed; policy import refuses them)."""
    if not any(g for g in grants.values()):
        return
    by_group: dict[tuple[int, bool, int], list[PolicyKey]] = {}
    for key, value in entries.items():
        if not value.deny:
            by_group.setdefault((key.subject, key.egress, key.peer), []).append(key)
    _split_under_wildcards(entries, grants, by_group)
    for key, own in grants.items():
        if not own or key not in entries or entries[key].deny:
            continue
        merged: list[Grant] = []
        open_ = False
        for peer in {key.peer, ids.ANY}:
            for other in by_group.get((key.subject, key.egress, peer), ()):
                if not _covers_ports(other, key):
                    continue
                theirs = grants.get(other)
                if not theirs:  # an L4-only allow (or one written without L7) covers it
                    open_ = True
                    break
                merged.extend(theirs)
            if open_:
                break
        value = entries[key]
        if open_:
            continue
        unique = tuple(sorted(dict.fromkeys(merged), key=lambda g: g.rule))
        kinds = {g.kind for g in unique}
        if len(kinds) == 1:
            entries[key] = PolicyValue(False, value.rule, 0, L7Filter(kinds.pop(), unique))
        else:  # http and kafka on one entry: nothing can satisfy both, deny every request
            entries[key] = PolicyValue(False, value.rule, 0, L7Filter("http", ()))


def l7_kind_conflicts(rules: Iterable[Rule]) -> str | None:
    """A message if two rules put different L7 protocols on overlapping ports of one direction
    (one port takes one L7 protocol, as Cilium), else None."""
    seen: dict[tuple[bool, int], list[tuple[int, int, str, Rule]]] = {}
    for rule in rules:
        for egress, section in ((False, rule.ingress), (True, rule.egress)):
            for pr in section:
                for port in pr.ports:
                    l7 = getattr(port, "l7", None)
                    if l7 is None:
                        continue
                    kind = "kafka" if l7.kafka else "http"
                    for first, last, other_kind, other in seen.get((egress, port.protocol), ()):
                        if other_kind != kind and first <= port.last and port.first <= last:
                            return (f"{rule.name} puts {kind} rules on {port} ({'egress' if egress else 'ingress'}) "
                                    f"where {other.name} has {other_kind} rules: one port takes one L7 protocol")
                    seen.setdefault((egress, port.protocol), []).append((port.first, port.last, kind, rule))
    return None


def compile_subject(
    subject: int,
    labels: LabelSet,
    rules: list[Rule],
    identities: Mapping[int, LabelSet],
    mode: str = "default",
    selected: list[Rule] | None = None,
    index: LabelIndex | None = None,
    services: ServicePeers = NO_SERVICES,
) -> Entries:
    """Every policy-map entry for one subject identity.

    `selected` (the rules that select the subject, in repository order) and `index` (of
    `identities`) are what compile_all precomputes once for every subject; alone, this
    function works them out itself. `services`: what the names of toServices stand for.
    """
    entries: Entries = {}
    if selected is None:
        selected = [r for r in rules if r.selector.matches(labels)]
    enf = enforcement(subject, labels, rules, mode, selected)
    if mode == "never":
        for egress in (False, True):
            entries[PolicyKey(subject, egress, ids.ANY, 0, 0, 0, True)] = PolicyValue(False, 0)
        return entries
    for egress, enforced in ((False, enf.ingress), (True, enf.egress)):
        if not enforced:
            entries[PolicyKey(subject, egress, ids.ANY, 0, 0, 0, True)] = PolicyValue(False, 0)
        denies: Entries = {}
        grants: dict[PolicyKey, list[Grant] | None] = {}  # L7 rules per allow key; None = one allows all
        for rule in selected:
            for pr in rule.egress if egress else rule.ingress:
                for peer in _peers(pr, identities, index, services):
                    for key, l7 in _keys(subject, egress, peer, pr.ports):
                        entries.setdefault(key, PolicyValue(False, rule.id))
                        if l7 is None:
                            grants[key] = None
                        elif key not in grants:
                            grants[key] = [_grant(rule, l7)]
                        elif grants[key] is not None:
                            grants[key].append(_grant(rule, l7))  # type: ignore[union-attr]
            for pr in rule.egress_deny if egress else rule.ingress_deny:
                for peer in _peers(pr, identities, index, services):
                    for key, _ in _keys(subject, egress, peer, pr.ports):
                        denies.setdefault(key, PolicyValue(True, rule.id))
            requires = [s for pr in (rule.egress if egress else rule.ingress) for s in pr.requires]
            if requires:
                for number, peer_labels in identities.items():
                    if not all(s.matches(peer_labels) for s in requires):
                        key = PolicyKey(subject, egress, number, 0, 0, 0, True)
                        denies.setdefault(key, PolicyValue(True, rule.id))
        for key, value in denies.items():
            entries[key] = value  # deny wins over an allow on the same key
        _drop_covered_allows(entries, denies)
        _l7_filters(entries, grants)
    return entries


def _drop_covered_allows(entries: Entries, denies: Entries) -> None:
    """An allow inside a broader deny of the same peer would shadow it in an LPM lookup."""
    if not denies:
        return
    by_group: dict[tuple[int, bool, int], list[PolicyKey]] = {}
    for key in denies:
        by_group.setdefault((key.subject, key.egress, key.peer), []).append(key)
    for key, value in list(entries.items()):
        if value.deny:
            continue
        for deny in by_group.get((key.subject, key.egress, key.peer), ()):
            if deny != key and deny.covers(key):
                del entries[key]
                break


def compile_all(
    subjects: Mapping[int, LabelSet],
    rules: list[Rule],
    identities: Mapping[int, LabelSet],
    mode: str = "default",
    services: ServicePeers = NO_SERVICES,
) -> Entries:
    """Every entry for every subject. Each rule's selector is matched against the subjects
    once, through a label index, rather than every rule against every subject."""
    entries: Entries = {}
    by_subject: dict[int, list[int]] = {n: [] for n in subjects}
    subject_index = LabelIndex(subjects)
    for position, rule in enumerate(rules):
        for number in subject_index.matching(rule.selector):
            by_subject[number].append(position)
    peer_index = LabelIndex(identities)
    for number, labels in subjects.items():
        selected = [rules[i] for i in by_subject[number]]
        entries.update(compile_subject(number, labels, rules, identities, mode, selected, peer_index, services))
    return entries


# -- decide (the datapath's algorithm) -------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    key: PolicyKey | None  # the entry that decided; None = no entry (default deny)
    value: PolicyValue | None

    @property
    def rule(self) -> int:
        return self.value.rule if self.value else 0


def _lpm(entries: Mapping[PolicyKey, PolicyValue], subject: int, egress: bool, peer: int,
         proto: int, port: int) -> tuple[PolicyKey, PolicyValue] | None:
    for bits in range(16, -1, -1):
        masked = (port >> (16 - bits) << (16 - bits)) if bits else 0
        key = PolicyKey(subject, egress, peer, proto, masked, bits)
        if key in entries:
            return key, entries[key]
    key = PolicyKey(subject, egress, peer, 0, 0, 0, True)
    if key in entries:
        return key, entries[key]
    return None


def decide(entries: Mapping[PolicyKey, PolicyValue], subject: int, egress: bool, peer: int,
           proto: int, port: int) -> Decision:
    """What the kernel decides for a packet of a new or established flow."""
    specific = _lpm(entries, subject, egress, peer, proto, port) if peer != ids.ANY else None
    wildcard = _lpm(entries, subject, egress, ids.ANY, proto, port)
    for hit in (specific, wildcard):
        if hit and hit[1].deny:
            return Decision(False, *hit)
    for hit in (specific, wildcard):
        if hit:
            return Decision(True, *hit)
    return Decision(False, None, None)


# -- exact-match verdicts (the kernel's cg_policy_exact) ----------------------------------------


def is_exact(key: PolicyKey) -> bool:
    """An entry for one peer, one protocol and one port: the kernel also keeps its verdict in an
    exact-match hash that a packet looks up before the LPM trie."""
    return key.peer != ids.ANY and not key.any_proto and key.port_bits == 16


def _covers_port(wild: PolicyKey, key: PolicyKey) -> bool:
    if wild.any_proto:
        return True
    if wild.proto != key.proto:
        return False
    return wild.port_bits == 0 or wild.port >> (16 - wild.port_bits) == key.port >> (16 - wild.port_bits)


class ExactVerdicts:
    """The verdict `decide` gives for each exact entry's own packets, kept in step with the entries.

    For an exact key the peer's entry is the longest match, so its verdict is that entry unless it
    allows and the wildcard peer's longest match denies: then the wildcard's deny. The kernel looks
    this verdict up first (one hash probe instead of two trie lookups per side) and falls back to
    the trie on a miss. A wildcard change touches every exact verdict of its subject and direction;
    the index finds those without a walk over all entries."""

    def __init__(self) -> None:
        self.entries: dict[PolicyKey, PolicyValue] = {}
        self.verdicts: dict[PolicyKey, PolicyValue] = {}
        self._wild: dict[tuple[int, bool], dict[PolicyKey, PolicyValue]] = {}
        self._exact: dict[tuple[int, bool], set[PolicyKey]] = {}

    def verdict(self, key: PolicyKey) -> PolicyValue:
        own = self.entries[key]
        if own.deny:
            return own
        best: tuple[PolicyKey, PolicyValue] | None = None
        for wild, value in self._wild.get((key.subject, key.egress), {}).items():
            if _covers_port(wild, key) and (best is None or wild.prefixlen > best[0].prefixlen):
                best = (wild, value)
        if best is not None and best[1].deny:
            return PolicyValue(True, best[1].rule, best[1].l7)
        return own

    def change(self, upserts: Mapping[PolicyKey, PolicyValue],
               deletes: Iterable[PolicyKey]) -> tuple[dict[PolicyKey, PolicyValue], list[PolicyKey]]:
        """Apply a change of the entries; the exact verdicts to write and to remove."""
        touched: set[PolicyKey] = set()
        groups: set[tuple[int, bool]] = set()
        for key in deletes:
            if self.entries.pop(key, None) is None:
                continue
            self._index(key, None, touched, groups)
        for key, value in upserts.items():
            self.entries[key] = value
            self._index(key, value, touched, groups)
        for group in groups:
            touched |= self._exact.get(group, set())
        writes: dict[PolicyKey, PolicyValue] = {}
        removes: list[PolicyKey] = []
        for key in touched:
            if key in self.entries:
                value = self.verdict(key)
                if self.verdicts.get(key) != value:
                    writes[key] = self.verdicts[key] = value
            elif self.verdicts.pop(key, None) is not None:
                removes.append(key)
        return writes, removes

    def _index(self, key: PolicyKey, value: PolicyValue | None, touched: set[PolicyKey],
               groups: set[tuple[int, bool]]) -> None:
        group = (key.subject, key.egress)
        if is_exact(key):
            touched.add(key)
            exact = self._exact.setdefault(group, set())
            if value is not None:
                exact.add(key)
            else:
                exact.discard(key)
        elif key.peer == ids.ANY:
            groups.add(group)
            wild = self._wild.setdefault(group, {})
            if value is not None:
                wild[key] = value
            else:
                wild.pop(key, None)
