"""datapath.policy.compile: the label index behind compile_all gives exactly the unindexed result."""

from __future__ import annotations

import random
from typing import Any

import pytest

from datapath import identity as ids
from datapath.errors import InvalidRequest
from datapath.labels import LabelSet, from_runtime
from datapath.policy import Rule, Scope, Selector, parse_rules, parse_selector
from datapath.policy.compile import Entries, LabelIndex, compile_all, compile_subject

APPS, TIERS, NAMESPACES = ("a", "b", "c", "d"), ("x", "y"), ("default", "prod")
MODES = ("default", "always", "never")


def _selector(rng: random.Random) -> dict[str, Any]:
    pick = rng.random()
    if pick < 0.15:
        return {}
    if pick < 0.2:
        return {"matchLabels": {"k8s:io.kubernetes.pod.namespace": rng.choice(NAMESPACES)}}
    if pick < 0.5:
        return {"matchLabels": {"app": rng.choice(APPS)}}
    if pick < 0.7:
        key = rng.choice(("container:app", "cni:app", "app"))
        return {"matchLabels": {key: rng.choice(APPS), "tier": rng.choice(TIERS)}}
    expr: dict[str, Any] = {"key": rng.choice(("app", "env", "tier")),
                            "operator": rng.choice(("In", "NotIn", "Exists", "DoesNotExist"))}
    if expr["operator"] in ("In", "NotIn"):
        expr["values"] = rng.sample(APPS, 2)
    return {"matchExpressions": [expr]}


def _scene(rng: random.Random) -> tuple[dict[int, LabelSet], list[Rule]]:
    identities: dict[int, LabelSet] = dict(ids.RESERVED_LABELS)
    for number in range(256, 256 + rng.randint(1, 8)):
        raw = {"app": rng.choice(APPS), "tier": rng.choice(TIERS)}
        if rng.random() < 0.3:
            raw["env"] = "prod"
        if rng.random() < 0.4:  # else in namespace default, without the label
            raw["io.kubernetes.pod.namespace"] = rng.choice(NAMESPACES)
        identities[number] = from_runtime(raw, rng.choice(("container", "cni")))
    while True:
        rules = []
        for _ in range(rng.randint(0, 6)):
            rule: dict[str, Any] = {"endpointSelector": _selector(rng)}
            for direction, peers in (("ingress", "fromEndpoints"), ("egress", "toEndpoints"),
                                     ("ingressDeny", "fromEndpoints")):
                if rng.random() < 0.5:
                    entry: dict[str, Any] = {peers: [_selector(rng)] if rng.random() < 0.9 else []}
                    if rng.random() < 0.5:
                        entry["toPorts"] = [{"ports": [{"port": str(rng.choice((80, 443))), "protocol": "TCP"}]}]
                    rule[direction] = [entry]
            pick = rng.random()
            if pick < 0.3:
                rule = {"kind": "CiliumNetworkPolicy", "metadata": {"namespace": rng.choice(NAMESPACES)},
                        "spec": rule}
            elif pick < 0.4:
                rule = {"kind": "CiliumClusterwideNetworkPolicy", "spec": rule}
            rules.append(rule)
        try:
            return identities, parse_rules(rules)
        except InvalidRequest:
            continue


def _unindexed(subjects: dict[int, LabelSet], rules: list[Rule], identities: dict[int, LabelSet],
               mode: str) -> Entries:
    entries: Entries = {}
    for number, labels in subjects.items():
        entries.update(compile_subject(number, labels, rules, identities, mode))
    return entries


@pytest.mark.parametrize("seed", range(60))
def test_compile_all_equals_the_unindexed_compile(seed: int) -> None:
    rng = random.Random(seed)
    identities, rules = _scene(rng)
    subjects = {n: lb for n, lb in identities.items() if n >= ids.FIRST_ALLOCATED or n == ids.INIT}
    for mode in MODES:
        assert compile_all(subjects, rules, identities, mode) == _unindexed(subjects, rules, identities, mode)


@pytest.mark.parametrize("seed", range(30))
def test_index_matching_equals_selector_matches(seed: int) -> None:
    rng = random.Random(1000 + seed)
    identities, _ = _scene(rng)
    index = LabelIndex(identities)
    for _ in range(20):
        selector: Selector = parse_selector(_selector(rng), "test")
        assert sorted(index.matching(selector)) == sorted(n for n, lb in identities.items() if selector.matches(lb))
        scoped = Scope("CiliumNetworkPolicy", rng.choice(NAMESPACES)).peer(selector, "test", "fromEntities")
        assert sorted(index.matching(scoped)) == sorted(n for n, lb in identities.items() if scoped.matches(lb))
