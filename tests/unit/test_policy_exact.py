"""datapath.policy.compile.ExactVerdicts: the kernel's exact-match verdicts, looked up before the
trie, give what `decide` gives for every packet, through any sequence of changes."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.policy.compile import ExactVerdicts, PolicyKey, PolicyValue, decide, is_exact

SUBJECTS, PEERS, PORTS = (256, 257), (0, 300, 301), (80, 81, 443, 8080)


def _key(rng: random.Random) -> PolicyKey:
    subject, egress, peer = rng.choice(SUBJECTS), rng.random() < 0.5, rng.choice(PEERS)
    shape = rng.random()
    if shape < 0.15:
        return PolicyKey(subject, egress, peer, 0, 0, 0, True)
    proto = rng.choice((6, 17))
    if shape < 0.3:
        return PolicyKey(subject, egress, peer, proto, 0, 0)
    if shape < 0.45:  # a port block: 80-95, 0-1023 and the like
        bits = rng.choice((6, 12))
        port = rng.choice(PORTS) >> (16 - bits) << (16 - bits)
        return PolicyKey(subject, egress, peer, proto, port, bits)
    return PolicyKey(subject, egress, peer, proto, rng.choice(PORTS), 16)


def _value(rng: random.Random) -> PolicyValue:
    return PolicyValue(rng.random() < 0.3, rng.randrange(1, 50), rng.choice((0, 0, 0, 7)))


def _kernel(exact: ExactVerdicts, subject: int, egress: bool, peer: int, proto: int, port: int) -> tuple[bool, int]:
    """The datapath: the exact verdict if there is one, else both trie lookups (decide)."""
    key = PolicyKey(subject, egress, peer, proto, port, 16)
    hit = exact.verdicts.get(key) if peer else None
    if hit is not None:
        return not hit.deny, hit.rule
    d = decide(exact.entries, subject, egress, peer, proto, port)
    return d.allowed, d.rule


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1))
def test_exact_verdicts_decide_as_the_trie_through_any_changes(seed: int) -> None:
    rng = random.Random(seed)
    exact = ExactVerdicts()
    for _ in range(rng.randrange(1, 6)):
        upserts = {_key(rng): _value(rng) for _ in range(rng.randrange(0, 12))}
        deletes = rng.sample(sorted(exact.entries), min(len(exact.entries), rng.randrange(0, 5)))
        deletes = [k for k in deletes if k not in upserts]
        before = dict(exact.verdicts)
        writes, removes = exact.change(upserts, deletes)
        # the diff takes the old verdicts to the new ones exactly
        after = {k: v for k, v in before.items() if k not in removes}
        after.update(writes)
        assert after == exact.verdicts
        assert set(exact.verdicts) == {k for k in exact.entries if is_exact(k)}
        for subject in SUBJECTS:
            for egress in (False, True):
                for peer in PEERS:
                    for proto in (6, 17):
                        for port in PORTS:
                            want = decide(exact.entries, subject, egress, peer, proto, port)
                            assert _kernel(exact, subject, egress, peer, proto, port) == (want.allowed, want.rule)


def test_a_wildcard_deny_overrides_the_exact_allow_and_lifting_it_restores_it() -> None:
    exact = ExactVerdicts()
    allow = PolicyKey(256, False, 300, 6, 80, 16)
    writes, removes = exact.change({allow: PolicyValue(False, 1)}, ())
    assert writes == {allow: PolicyValue(False, 1)} and removes == []
    deny_all = PolicyKey(256, False, 0, 0, 0, 0, True)
    writes, removes = exact.change({deny_all: PolicyValue(True, 9)}, ())
    assert writes == {allow: PolicyValue(True, 9)}, "the wildcard's deny is folded into the exact verdict"
    writes, removes = exact.change({}, [deny_all])
    assert writes == {allow: PolicyValue(False, 1)} and removes == []
    other_side = PolicyKey(256, True, 0, 0, 0, 0, True)  # egress: another group, nothing to recompute
    assert exact.change({other_side: PolicyValue(True, 3)}, ()) == ({}, [])
    assert exact.change({}, [allow]) == ({}, [allow])
    assert exact.verdicts == {}
