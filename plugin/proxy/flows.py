"""What the proxy knows of a redirected connection (Flow), where it learns it (the FlowSource
port: the datapath's conntrack in production, a fake in tests), and how it reports (Emit).
Imports datapath.policy.l7 only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from datapath.policy.l7 import HttpRequest, KafkaRequest, L7Filter, L7Verdict

Address = tuple[str, int]


@dataclass(frozen=True)
class Flow:
    client: Address  # the peer of the accepted socket (the real sender)
    original: Address  # the destination the sender asked for (the accepted socket's own address)
    src_identity: int
    dst_identity: int
    egress: L7Filter | None  # the sender's egress L7 rules; None: that side does not filter at L7
    ingress: L7Filter | None  # the receiver's ingress L7 rules; None likewise
    mark: int = 0  # SO_MARK for the upstream socket (carries src_identity to the datapath)
    src_labels: tuple[str, ...] = ()
    dst_labels: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """"http" or "kafka": the protocol the filters speak (both sides agree, policy import ensures it)."""
        for f in (self.egress, self.ingress):
            if f is not None:
                return f.kind
        return "http"

    def _combine(self, verdicts: list[tuple[str, L7Verdict]]) -> tuple[L7Verdict, str]:
        for side, v in verdicts:
            if not v.allowed:
                return v, side
        if not verdicts:
            return L7Verdict(True, 0, ("no L7 rules on either side",)), ""
        side, v = verdicts[-1]
        return v, side

    def http_verdict(self, req: HttpRequest) -> tuple[L7Verdict, str]:
        """The verdict and the side that decided ("egress"/"ingress"): every side with L7 rules must allow."""
        return self._combine([(s, f.http_verdict(req)) for s, f in (("egress", self.egress),
                                                                    ("ingress", self.ingress)) if f is not None])

    def kafka_verdict(self, req: KafkaRequest) -> tuple[L7Verdict, str]:
        return self._combine([(s, f.kafka_verdict(req)) for s, f in (("egress", self.egress),
                                                                     ("ingress", self.ingress)) if f is not None])


class FlowSource(Protocol):
    def lookup(self, client: Address, original: Address) -> Flow | None:
        """The flow the datapath redirected, as it stands now (called per connection and again per
        request, so a policy change applies to the next request); None: not a redirected flow, or
        no longer allowed at L3/L4 (the proxy closes the connection)."""


# Opens the upstream connection for a flow (production: to flow.original with SO_MARK = flow.mark).
Connector = Callable[[Flow], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class Limits:
    max_header_bytes: int = 16384  # request line plus headers (HTTP/1.1), header block (HTTP/2)
    max_kafka_frame: int = 16 << 20
    idle_timeout: float = 60.0  # a client that sends nothing for this long is closed
    header_timeout: float = 10.0  # a request's head must arrive within this (slow-loris)


@dataclass
class L7Event:
    """One request and its verdict (`cellgate monitor --type l7`, the access log)."""

    kind: str  # "http" | "kafka"
    verdict: str  # "forwarded" | "denied" | "error"
    flow: Flow
    side: str = ""  # the side whose rules decided: "egress" | "ingress" | ""
    rule: int = 0
    http: dict[str, Any] = field(default_factory=dict)  # method, path, host, protocol, status
    # api_key, api_key_name, api_version, correlation_id, client_id, topics, error_code
    kafka: dict[str, Any] = field(default_factory=dict)
    info: str = ""
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "l7", "time": self.time, "l7": self.kind, "verdict": self.verdict, "side": self.side,
            "rule": self.rule, "src": f"{self.flow.client[0]}:{self.flow.client[1]}",
            "dst": f"{self.flow.original[0]}:{self.flow.original[1]}",
            "src_identity": self.flow.src_identity, "dst_identity": self.flow.dst_identity,
            "src_labels": list(self.flow.src_labels), "dst_labels": list(self.flow.dst_labels),
        }
        if self.http:
            out["http"] = self.http
        if self.kafka:
            out["kafka"] = self.kafka
        if self.info:
            out["info"] = self.info
        return out


Emit = Callable[[L7Event], None]
