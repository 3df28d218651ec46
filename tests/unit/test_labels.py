"""datapath.labels: parsing, the text form, and what a runtime's labels may contribute."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datapath import labels
from datapath.labels import Label, canonical, from_runtime, render


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("app=web", "any", Label("any", "app", "web")),
        ("app", "any", Label("any", "app", "")),
        ("app=", "any", Label("any", "app", "")),
        ("k8s:app=web", "any", Label("k8s", "app", "web")),
        ("reserved:host", "any", Label("reserved", "host", "")),
        ("container:a=b=c", "any", Label("container", "a", "b=c")),  # the value may hold '='
        ("com.example:tier=db", "any", Label("any", "com.example:tier", "db")),  # not a source: part of the key
        ("app=web", "container", Label("container", "app", "web")),
        ("mesos:app=web", "container", Label("mesos", "app", "web")),
        ("any:app=web", "container", Label("any", "app", "web")),
    ],
)
def test_parse(text: str, default: str, expected: Label) -> None:
    assert Label.parse(text, default) == expected


@pytest.mark.parametrize("text", ["", "=web", "k8s:", "k8s:=web", "reserved:"])
def test_parse_refuses_an_empty_key(text: str) -> None:
    with pytest.raises(ValueError, match="empty key"):
        Label.parse(text)


@pytest.mark.parametrize(
    ("label", "text"),
    [
        (Label("container", "app", "web"), "container:app=web"),
        (Label("reserved", "host"), "reserved:host"),
        (Label("container", "com.example:tier", "db"), "container:com.example:tier=db"),
        (Label("k8s", "io.kubernetes.pod.namespace", "default"), "k8s:io.kubernetes.pod.namespace=default"),
    ],
)
def test_str_round_trips(label: Label, text: str) -> None:
    assert str(label) == text
    assert Label.parse(text) == label


KEYS = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20)
VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)


@given(raw=st.dictionaries(KEYS, VALUES, max_size=8), source=st.sampled_from(["container", "mesos", "cni"]))
def test_runtime_labels_survive_their_text_form(raw: dict[str, str], source: str) -> None:
    """Endpoint documents and identity documents store labels as text: parsing it gives them back."""
    got = from_runtime(raw, source, exclude=())
    assert {Label.parse(text) for text in render(got)} == got
    assert all(label.source == source for label in got)


def test_from_runtime_gives_every_label_the_runtime_source() -> None:
    got = from_runtime({"app": "web", "tier": "front", "flag": ""}, "container")
    assert got == {Label("container", "app", "web"), Label("container", "tier", "front"),
                   Label("container", "flag", "")}


@pytest.mark.parametrize(
    "key",
    ["reserved:host", "reserved:init", "k8s:app", "container:app", "mesos:app", "any:app", "cidr:10.0.0.0/8",
     "cellgate:x", "unspec:name"],
)
def test_from_runtime_drops_keys_that_name_a_source(key: str) -> None:
    """A container cannot pose as the host, another runtime or a selector wildcard by naming its labels so."""
    got = from_runtime({key: "", "app": "web"}, "container")
    assert got == {Label("container", "app", "web")}
    assert not any(label.source == "reserved" for label in got)


def test_from_runtime_keeps_colons_that_do_not_name_a_source() -> None:
    got = from_runtime({"com.example:tier": "db", "io.x/y:z": "1"}, "container")
    assert got == {Label("container", "com.example:tier", "db"), Label("container", "io.x/y:z", "1")}


def test_from_runtime_leaves_out_excluded_prefixes() -> None:
    raw = {
        "org.opencontainers.image.revision": "abc",
        "org.label-schema.build-date": "2020",
        "maintainer": "me",
        "com.docker.compose.config-hash": "f00",
        "com.docker.compose.container-number": "1",
        "com.docker.compose.service": "web",  # identifies the workload: kept
        "app": "web",
    }
    got = from_runtime(raw, "container")
    assert got == {Label("container", "com.docker.compose.service", "web"), Label("container", "app", "web")}
    assert from_runtime(raw, "container", exclude=("app",)) >= {Label("container", "maintainer", "me")}
    assert Label("container", "app", "web") not in from_runtime(raw, "container", exclude=("app",))


def test_from_runtime_leaves_out_oversized_and_nul_entries() -> None:
    raw = {
        "k" * labels.MAX_KEY: "ok",
        "x" * (labels.MAX_KEY + 1): "too long a key",
        "big": "v" * (labels.MAX_VALUE + 1),
        "fits": "v" * labels.MAX_VALUE,
        "nul\0key": "v",
        "nulvalue": "a\0b",
        "": "empty key",
        "a=b": "c",  # would read back as a=(b=c)
    }
    got = from_runtime(raw, "container")
    assert {label.key for label in got} == {"k" * labels.MAX_KEY, "fits"}


def test_from_runtime_keeps_the_first_labels_in_key_order() -> None:
    raw = {f"k{i:04d}": str(i) for i in range(labels.MAX_LABELS + 10)}
    shuffled = dict(sorted(raw.items(), key=lambda kv: hash(kv[0]) % 97))
    got = from_runtime(shuffled, "container")
    assert len(got) == labels.MAX_LABELS
    assert {label.key for label in got} == {f"k{i:04d}" for i in range(labels.MAX_LABELS)}
    assert from_runtime(raw, "container") == got  # insertion order does not matter


def test_canonical_and_render_are_sorted_and_stable() -> None:
    a = frozenset({Label("container", "b", "2"), Label("container", "a", "1"), Label("k8s", "a", "0")})
    b = frozenset(sorted(a, reverse=True))
    assert canonical(a) == canonical(b) == "container:a=1;container:b=2;k8s:a=0;"
    assert render(a) == ["container:a=1", "container:b=2", "k8s:a=0"]
    assert canonical(frozenset()) == ""


def test_reserved() -> None:
    assert labels.reserved("host") == {Label("reserved", "host", "")}
