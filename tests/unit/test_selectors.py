"""datapath.policy selectors: matchLabels and matchExpressions against label sets, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from datapath import identity as ids
from datapath.errors import InvalidRequest
from datapath.labels import Label, LabelSet
from datapath.policy import Requirement, parse_selector


def L(*texts: str) -> LabelSet:
    return frozenset(Label.parse(t) for t in texts)


WEB = L("container:app=web", "container:env=prod")
DB = L("container:app=db", "container:env=dev")
BARE = L("container:app=web")
K8S = L("k8s:app=web", "k8s:env=prod")
NOLABELS: LabelSet = frozenset()
HOST = ids.RESERVED_LABELS[ids.HOST]
WORLD = ids.RESERVED_LABELS[ids.WORLD]
INIT = ids.RESERVED_LABELS[ids.INIT]


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    e: dict[str, Any] = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


CASES = [
    # (selector, labels, matches)
    ({}, WEB, True),
    ({}, NOLABELS, True),
    ({}, HOST, False),  # an empty selector selects endpoints, never a reserved identity (entities name those)
    ({"matchLabels": {}}, WORLD, False),
    ({}, INIT, False),
    ({"matchLabels": {"host": ""}}, HOST, False),  # only a key with the reserved: source selects one
    ({"matchLabels": {"app": "web"}}, WEB, True),
    ({"matchLabels": {"app": "web"}}, K8S, True),  # no source: any source
    ({"matchLabels": {"app": "web"}}, DB, False),
    ({"matchLabels": {"app": "web"}}, NOLABELS, False),
    ({"matchLabels": {"app": "web", "env": "prod"}}, WEB, True),  # ANDed
    ({"matchLabels": {"app": "web", "env": "prod"}}, BARE, False),
    ({"matchLabels": {"any:app": "web"}}, K8S, True),
    ({"matchLabels": {"container:app": "web"}}, WEB, True),
    ({"matchLabels": {"container:app": "web"}}, K8S, False),  # a source must match
    ({"matchLabels": {"k8s:app": "web"}}, WEB, False),
    ({"matchLabels": {"reserved:host": ""}}, HOST, True),
    ({"matchLabels": {"reserved:host": ""}}, WEB, False),
    ({"matchLabels": {"reserved:host": ""}}, L("container:host="), False),  # a container cannot be the host
    ({"matchLabels": {"reserved:world": ""}}, WORLD, True),
    ({"matchLabels": {"reserved:init": ""}}, INIT, True),
    ({"matchLabels": {"app": ""}}, L("container:app"), True),
    ({"matchLabels": {"app": ""}}, WEB, False),
    ({"matchLabels": {"version": 2}}, L("container:version=2"), True),  # YAML numbers are strings here
    # In
    (expr("app", "In", "web", "db"), WEB, True),
    (expr("app", "In", "web", "db"), DB, True),
    (expr("app", "In", "cache"), WEB, False),
    (expr("app", "In", "web"), NOLABELS, False),  # absent key: not in
    (expr("k8s:app", "In", "web"), WEB, False),
    (expr("k8s:app", "In", "web"), K8S, True),
    # NotIn
    (expr("app", "NotIn", "db"), WEB, True),
    (expr("app", "NotIn", "web"), WEB, False),
    (expr("app", "NotIn", "web", "db"), DB, False),
    (expr("app", "NotIn", "web"), NOLABELS, True),  # absent key: not in, as Kubernetes
    (expr("app", "NotIn", "web"), HOST, False),  # nor does a selector that only excludes
    (expr("app", "DoesNotExist"), WORLD, False),
    (expr("container:app", "NotIn", "web"), K8S, True),  # a k8s:app label is not container:app
    # Exists
    (expr("app", "Exists"), WEB, True),
    (expr("app", "Exists"), L("container:app"), True),
    (expr("app", "Exists"), NOLABELS, False),
    (expr("k8s:app", "Exists"), WEB, False),
    (expr("reserved:host", "Exists"), HOST, True),
    # DoesNotExist
    (expr("app", "DoesNotExist"), WEB, False),
    (expr("app", "DoesNotExist"), NOLABELS, True),
    (expr("tier", "DoesNotExist"), WEB, True),
    (expr("k8s:app", "DoesNotExist"), WEB, True),
    # matchLabels and matchExpressions together are ANDed
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
     WEB, True),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
     BARE, False),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "env", "operator": "NotIn",
                                                                   "values": ["dev"]}]}, DB, False),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "env", "operator": "NotIn",
                                                                   "values": ["dev"]}]}, BARE, True),
]


@pytest.mark.parametrize(("raw", "labels", "matches"), CASES)
def test_selector_matching(raw: dict[str, Any], labels: LabelSet, matches: bool) -> None:
    sel = parse_selector(raw, "test")
    assert sel.matches(labels) is matches
    assert sel.wildcard is (not raw.get("matchLabels") and not raw.get("matchExpressions"))


def test_every_operator_is_covered() -> None:
    used = {e["operator"] for raw, _, _ in CASES for e in raw.get("matchExpressions", [])}
    assert used == {"In", "NotIn", "Exists", "DoesNotExist"}


def test_selector_keys_default_to_any_source_and_keep_the_given_one() -> None:
    sel = parse_selector({"matchLabels": {"app": "web", "k8s:env": "prod"},
                          "matchExpressions": [{"key": "reserved:host", "operator": "Exists"}]}, "w")
    assert set(sel.requirements) == {
        Requirement("any", "app", "In", ("web",)),
        Requirement("k8s", "env", "In", ("prod",)),
        Requirement("reserved", "host", "Exists", ()),
    }
    assert sel.text == '{"matchExpressions":[{"key":"reserved:host","operator":"Exists"}],' \
                       '"matchLabels":{"app":"web","k8s:env":"prod"}}'


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "w: a selector must be an object"),
        ("app=web", "w: a selector must be an object"),
        (None, "w: a selector must be an object"),
        ({"matchLabel": {}}, "w: unknown field 'matchLabel' (did you mean 'matchLabels'?)"),
        ({"matchlabels": {}}, "unknown field 'matchlabels'"),
        ({"matchLabels": ["app=web"]}, "w.matchLabels: must be an object"),
        ({"matchLabels": {"app": True}}, "w.matchLabels.app: value must be a string"),
        ({"matchLabels": {"app": None}}, "w.matchLabels.app: value must be a string"),
        ({"matchLabels": {"app": ["web"]}}, "w.matchLabels.app: value must be a string"),
        ({"matchLabels": {"": "x"}}, "w.matchLabels: label '' has an empty key"),
        ({"matchLabels": {"k8s:": "x"}}, "w.matchLabels: label 'k8s:' has an empty key"),
        ({"matchExpressions": {"key": "app"}}, "w.matchExpressions: must be a list"),
        ({"matchExpressions": ["app"]}, "w.matchExpressions[0]: must be an object"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "w.matchExpressions[0].key: required"),
        ({"matchExpressions": [{"key": "", "operator": "Exists"}]}, "w.matchExpressions[0].key: required"),
        ({"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]},
         "w.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist"),
        ({"matchExpressions": [{"key": "app"}]}, "w.matchExpressions[0].operator: must be one of"),
        ({"matchExpressions": [{"key": "app", "operator": "In"}]},
         "w.matchExpressions[0].values: In needs at least one value"),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]},
         "w.matchExpressions[0].values: NotIn needs at least one value"),
        ({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
         "w.matchExpressions[0].values: Exists takes no values"),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]},
         "w.matchExpressions[0].values: DoesNotExist takes no values"),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": "web"}]},
         "w.matchExpressions[0].values: must be a list of strings"),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": [1]}]},
         "w.matchExpressions[0].values: must be a list of strings"),
        ({"matchExpressions": [{"key": "app", "operator": "Exists", "value": "x"}]},
         "w.matchExpressions[0]: unknown field 'value' (did you mean 'values'?)"),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "b", "operator": "Nope"}]},
         "w.matchExpressions[1].operator"),
    ],
)
def test_bad_selectors_are_refused_with_their_place(raw: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_selector(raw, "w")
    assert message in str(err.value)
