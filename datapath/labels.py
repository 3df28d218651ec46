"""Labels: `source:key=value` values that identities and selectors are made of. Pure.

A container chooses its own labels, so labels that arrive from a runtime always get that
runtime's source (`container:`, `mesos:`, `cni:`); a key that tries to name a source of
its own is dropped, never honoured, so nothing can pose as `reserved:` or another runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

SOURCES = ("container", "mesos", "cni", "k8s", "reserved", "any", "unspec", "cidr", "cellgate")
ANY = "any"
RESERVED = "reserved"

MAX_LABELS = 256
MAX_KEY = 253
MAX_VALUE = 1024

# Image metadata that changes with every build and says nothing about what a workload is;
# keeping it out of identities avoids needless identity churn.
DEFAULT_EXCLUDE = (
    "org.opencontainers.",
    "org.label-schema.",
    "maintainer",
    "com.docker.compose.config-hash",
    "com.docker.compose.container-number",
    "com.docker.compose.oneoff",
    "com.docker.compose.version",
    "desktop.docker.io/",
)


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"

    @classmethod
    def parse(cls, text: str, default_source: str = ANY) -> Label:
        """`[source:]key[=value]`; the part before the first ':' is a source only if it is one."""
        key, _, value = text.partition("=")
        source, sep, rest = key.partition(":")
        if sep and source in SOURCES:
            key = rest
        else:
            source = default_source
        if not key:
            raise ValueError(f"label {text!r} has an empty key")
        return cls(source, key, value)


LabelSet = frozenset[Label]


def label_set(labels: Iterable[Label]) -> LabelSet:
    return frozenset(labels)


def canonical(labels: LabelSet) -> str:
    """Stable text form used as the identity key: sorted `source:key=value;` items."""
    return "".join(f"{label};" for label in sorted(labels))


def render(labels: LabelSet) -> list[str]:
    return [str(label) for label in sorted(labels)]


def from_runtime(raw: Mapping[str, str], source: str, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> LabelSet:
    """Labels a runtime reports for a workload, under that runtime's source.

    Keys that name a source themselves, excluded prefixes, keys with '=' (the text form
    could not be read back) and oversized entries are left out (and logged); so is
    anything past MAX_LABELS, in key order, so the result is stable.
    """
    prefixes = tuple(exclude)
    out: list[Label] = []
    for key in sorted(raw):
        value = raw[key]
        head, sep, _ = key.partition(":")
        if sep and head in SOURCES:
            log.warning("ignoring label %r: a workload cannot choose the %r source", key, head)
            continue
        if key.startswith(prefixes):
            continue
        if not key or len(key) > MAX_KEY or len(value) > MAX_VALUE or "\0" in key or "\0" in value:
            log.warning("ignoring label %r: empty, oversized or containing NUL", key[:64])
            continue
        if "=" in key:  # `source:key=value` could not be read back: it would become another label
            log.warning("ignoring label %r: '=' in a key", key[:64])
            continue
        if len(out) == MAX_LABELS:
            log.warning("ignoring labels past the first %d", MAX_LABELS)
            break
        out.append(Label(source, key, value))
    return frozenset(out)


def reserved(name: str) -> LabelSet:
    return frozenset({Label(RESERVED, name, "")})
