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
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from datapath import identity as ids
from datapath.cidr import is_cidr_identity
from datapath.labels import LabelSet
from datapath.policy.rules import PeerRule, PortRange, Rule
from datapath.policy.selectors import Selector, namespaces_of

ENFORCEMENT_MODES = ("default", "always", "never")


@dataclass(frozen=True, order=True)
class PolicyKey:
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


def _peers(pr: PeerRule, identities: Mapping[int, LabelSet], index: LabelIndex | None = None) -> set[int]:
    if pr.nobody:
        return set()  # an empty list of peers: nobody (Cilium >= 1.15)
    peers: set[int] = set()
    for sel in pr.endpoints:  # endpoints only, `{}` included (see Selector.matches)
        if index is not None:
            peers.update(index.matching(sel))
        else:
            peers.update(n for n, labels in identities.items() if sel.matches(labels))
    for cidr in pr.cidrs:  # the CIDR identities of prefixes inside the cidr and outside its excepts
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


@functools.lru_cache(maxsize=4096)
def _blocks(ports: tuple[PortRange, ...]) -> tuple[tuple[int, int, int, bool], ...]:
    """(protocol, port, prefix bits, any protocol) of the keys that cover `ports`, worked out once
    for all the peers of an entry."""
    if not ports:
        return ((0, 0, 0, True),)
    out: list[tuple[int, int, int, bool]] = []
    for pr in ports:
        if pr.protocol == 0:
            out.append((0, 0, 0, True))
            continue
        out.extend((pr.protocol, port, bits, False) for port, bits in port_prefixes(pr.first, pr.last))
    return tuple(out)


def _keys(subject: int, egress: bool, peer: int, ports: tuple[PortRange, ...]) -> list[PolicyKey]:
    return [PolicyKey(subject, egress, peer, proto, port, bits, any_proto)
            for proto, port, bits, any_proto in _blocks(ports)]


def compile_subject(
    subject: int,
    labels: LabelSet,
    rules: list[Rule],
    identities: Mapping[int, LabelSet],
    mode: str = "default",
    selected: list[Rule] | None = None,
    index: LabelIndex | None = None,
) -> Entries:
    """Every policy-map entry for one subject identity.

    `selected` (the rules that select the subject, in repository order) and `index` (of
    `identities`) are what compile_all precomputes once for every subject; alone, this
    function works them out itself.
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
        for rule in selected:
            for pr in rule.egress if egress else rule.ingress:
                for peer in _peers(pr, identities, index):
                    for key in _keys(subject, egress, peer, pr.ports):
                        entries.setdefault(key, PolicyValue(False, rule.id))
            for pr in rule.egress_deny if egress else rule.ingress_deny:
                for peer in _peers(pr, identities, index):
                    for key in _keys(subject, egress, peer, pr.ports):
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
        entries.update(compile_subject(number, labels, rules, identities, mode, selected, peer_index))
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
