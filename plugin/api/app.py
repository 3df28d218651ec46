"""The agent's REST API (the one the CLI uses; there is no other way in).

Errors are JSON problems: {"error": "...", "status": N} with a matching HTTP status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, ServiceUnavailable

from datapath.errors import CellgateError, InvalidRequest, NotFound
from datapath.identity import FIRST_ALLOCATED
from datapath.labels import Label
from datapath.policy import parse_rules
from plugin.api import views
from plugin.monitor import EventHub
from plugin.service import Agent
from plugin.timing import add_server_timing

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
EVENT_TYPES = {"drop", "verdict", "trace"}
# Long-lived requests each hold one of the socket's request workers (plugin/server.py, 64) for
# as long as they last; past these bounds they are refused (503), so the other calls always
# find at least half of the workers free.
MAX_STREAMS = 16  # monitor streams (and later flow streams) open at once
MAX_WAITS = 16  # policy waits at once


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, indent=None), status=status, mimetype="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply to be decoded") from None
    except ValueError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _labels_arg(text: str) -> list[Label] | None:
    if not text.strip():
        return None
    try:
        return [Label.parse(t.strip(), "unspec") for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class _Tracers:
    """Some events cost; the datapath emits them only while a monitor asks for them."""

    def __init__(self, switch: Callable[[bool], None]) -> None:
        self._switch = switch
        self._count = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1:
                self._switch(True)

    def stop(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self._switch(False)


class _Slots:
    """At most `limit` requests of one long-lived kind at a time; past it, 503 at once."""

    def __init__(self, what: str, limit: int) -> None:
        self._what = what
        self._limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None]:
        """A slot, or ServiceUnavailable; returns the function that gives it back (once)."""
        with self._lock:
            if self._used >= self._limit:
                raise ServiceUnavailable(f"{self._limit} {self._what} are open already; try again later")
            self._used += 1
        given_back = threading.Event()

        def release() -> None:
            with self._lock:
                if not given_back.is_set():
                    given_back.set()
                    self._used -= 1

        return release

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        release = self.take()
        try:
            yield
        finally:
            release()


def create_app(agent: Agent, hub: EventHub, info: Callable[[], dict[str, Any]]) -> Flask:
    app = Flask("cellgate.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    add_server_timing(app)
    tracers = _Tracers(agent.set_trace)
    verdicts = _Tracers(agent.set_verdicts)  # allowed new flows: every monitor but drop-only ones
    streams = _Slots("monitor streams", MAX_STREAMS)
    waits = _Slots("policy waits", MAX_WAITS)

    @app.errorhandler(CellgateError)
    def cellgate_error(exc: CellgateError) -> Response:
        problem: dict[str, Any] = {"error": str(exc), "status": exc.status}
        if hasattr(exc, "cni_code"):
            problem["cni_code"] = exc.cni_code  # for the CNI binary
        return _json(problem, exc.status)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        text = f"no such API path {request.path}" if code == 404 else (exc.description or "error")
        return _json({"error": text, "status": code}, code)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("API %s crashed", request.path)
        return _json({"error": f"internal error: {type(exc).__name__}", "status": 500}, 500)

    @app.get("/v1/healthz")
    def healthz() -> Response:
        return _json({"ok": True})

    @app.get("/v1/status")
    def status() -> Response:
        body = agent.status()
        body.update(info())
        body["counters"] = views.counters(agent.kernel.counters())
        body["monitor"] = {"subscribers": hub.subscribers, "events": hub.published, "lost": hub.lost}
        return _json(body)

    @app.get("/v1/endpoints")
    def endpoints() -> Response:
        eps = sorted(agent.endpoints.values(), key=lambda e: e.created)
        return _json([views.endpoint(e) for e in eps])

    @app.get("/v1/endpoints/<ident>")
    def endpoint(ident: str) -> Response:
        ep = agent.find_endpoint(ident)
        realized = {
            "enforcement": agent.policy.enforcement_of(ep),
            "revision": agent.policy.realized_revision,
            "entries": len(agent.policy.entries_of(ep.identity)),
            "identity_labels": agent.policy.labels_of(ep.identity),
        }
        return _json(views.endpoint(ep, realized))

    # -- policy -----------------------------------------------------------------------------

    @app.post("/v1/policy")
    def policy_import() -> Response:
        body = _body()
        if set(body) - {"rules"} or "rules" not in body:
            raise InvalidRequest("send {\"rules\": [...]}")
        revision = agent.policy_import(parse_rules(body["rules"]))
        return _json({"revision": revision})

    @app.get("/v1/policy")
    def policy_get() -> Response:
        labels = _labels_arg(request.args.get("labels", ""))
        revision, _ = agent.policy.repository.snapshot()
        rules = agent.policy.repository.select(labels)
        if labels and not rules:
            raise NotFound("no rule has labels " + request.args.get("labels", ""))
        return _json({"revision": revision, "rules": [views.rule(r) for r in rules]})

    @app.delete("/v1/policy")
    def policy_delete() -> Response:
        body = _body()
        if set(body) - {"labels", "all"}:
            raise InvalidRequest("send {\"labels\": [\"k=v\", ...]} or {\"all\": true}")
        if body.get("all") is True:
            revision, count = agent.policy_delete(None)
        else:
            raw = body.get("labels")
            labels = _labels_arg(",".join(raw)) if isinstance(raw, list) and all(isinstance(x, str) for x in raw) \
                else None
            if not labels:  # never None here: that would delete every rule
                raise InvalidRequest("labels must be a non-empty list of key=value strings (or send all: true)")
            revision, count = agent.policy_delete(labels)
        return _json({"revision": revision, "deleted": count})

    @app.get("/v1/policy/wait")
    def policy_wait() -> Response:
        try:
            revision = int(request.args.get("revision", ""))
            timeout = float(request.args.get("timeout", "30"))
        except ValueError:
            raise InvalidRequest("revision must be a number (and timeout seconds)") from None
        if not math.isfinite(timeout):  # NaN would never pass the deadline
            raise InvalidRequest("timeout must be a finite number of seconds")
        deadline = time.monotonic() + min(max(timeout, 0.0), 300.0)
        with waits.held():
            while agent.policy.realized_revision < revision:
                if revision > agent.policy.repository.revision:
                    raise InvalidRequest(f"revision {revision} does not exist yet "
                                         f"(latest is {agent.policy.repository.revision})")
                if time.monotonic() >= deadline:
                    return _json({"error": f"revision {revision} not enforced yet", "status": 504}, 504)
                time.sleep(0.05)
        return _json({"revision": agent.policy.realized_revision, "endpoints": len(agent.endpoints)})

    @app.post("/v1/policy/trace")
    def policy_trace() -> Response:
        body = _body()
        unknown = set(body) - {"src", "dst", "dport"}
        if unknown or not isinstance(body.get("src"), dict) or not isinstance(body.get("dst"), dict):
            raise InvalidRequest('send {"src": {KIND: VALUE}, "dst": {KIND: VALUE}, "dport": "80/tcp"} '
                                 "with KIND endpoint, identity or labels")
        src, dst = (_party(body[side], side) for side in ("src", "dst"))
        dport = body.get("dport") or ""
        if not isinstance(dport, str):
            raise InvalidRequest("dport must be a string like 80/tcp")
        result = agent.trace(src, dst, dport)
        return _json({
            "lines": result.lines,
            "verdict": "ALLOWED" if result.allowed else "DENIED",
            "egress": _decision(result.egress),
            "ingress": _decision(result.ingress),
        })

    def _party(spec: dict[str, Any], side: str) -> Any:
        if len(spec) != 1:
            raise InvalidRequest(f"{side}: give exactly one of endpoint, identity, labels")
        ((kind, value),) = spec.items()
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InvalidRequest(f"{side}.{kind}: must be a string")
        return agent.party(kind, str(value))

    def _decision(decision: Any) -> Any:
        if decision is None:
            return None
        return {"allowed": decision.allowed, "rule": decision.rule,
                "entry": decision.key.describe() if decision.key else None}

    # -- identities and datapath state ------------------------------------------------------

    @app.get("/v1/identities")
    def identities() -> Response:
        counts: dict[int, int] = {}
        for ep in list(agent.endpoints.values()):
            counts[ep.identity] = counts.get(ep.identity, 0) + 1
        out = []
        for number, labels in sorted(agent.policy.identities.all().items()):
            out.append(views.identity(number, sorted(str(x) for x in labels), counts.get(number, 0),
                                      number < FIRST_ALLOCATED))
        return _json(out)

    @app.get("/v1/identities/<int:number>")
    def identity(number: int) -> Response:
        labels = agent.policy.identities.labels_of(number)
        if labels is None:
            raise NotFound(f"unknown identity {number}")
        owners = sum(1 for e in list(agent.endpoints.values()) if e.identity == number)
        return _json(views.identity(number, sorted(str(x) for x in labels), owners, number < FIRST_ALLOCATED))

    @app.get("/v1/bpf/policy/<ident>")
    def bpf_policy(ident: str) -> Response:
        ep = agent.find_endpoint(ident)
        entries = [views.policy_entry(k, v, agent.policy.labels_of(k.peer) if k.peer else ["any"])
                   for k, v in agent.policy.entries_of(ep.identity)]
        return _json({"endpoint": ep.id, "identity": ep.identity, "entries": entries})

    @app.get("/v1/bpf/ct")
    def bpf_ct() -> Response:
        now = time.monotonic_ns()
        entries = [views.ct_entry(k, v, now) for k, v in agent.kernel.ct_entries()]
        entries.sort(key=lambda e: (e["protocol"], e["src"], e["sport"], e["dst"], e["dport"]))
        return _json(entries)

    @app.get("/v1/networks")
    def networks() -> Response:
        counts: dict[str, int] = {}
        for ep in list(agent.endpoints.values()):
            counts[ep.network_id] = counts.get(ep.network_id, 0) + 1
        return _json([views.network(n, counts.get(n.id, 0)) for n in agent.networks.values()])

    @app.get("/v1/ipam")
    def ipam() -> Response:
        return _json({
            "ranges": {"ipv4": str(agent.ipam.ranges.ipv4), "ipv6": str(agent.ipam.ranges.ipv6)},
            "pools": [views.pool(p) for p in agent.ipam.pools()],
        })

    @app.post("/v1/ipam/check")
    def ipam_check() -> Response:
        body = _body()
        unknown = set(body) - {"release", "grace"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        release = body.get("release", False)
        grace = body.get("grace", 60.0)
        if not isinstance(release, bool):
            raise InvalidRequest("release must be true or false")
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
            raise InvalidRequest("grace must be a number of seconds >= 0")
        return _json(views.check_report(*agent.ipam_check(release=release, grace=float(grace))))

    @app.get("/v1/monitor")
    def monitor() -> Response:
        wanted = request.args.get("type", "")
        if wanted and wanted not in EVENT_TYPES:
            raise InvalidRequest(f"unknown event type {wanted!r} (known: {', '.join(sorted(EVENT_TYPES))})")
        endpoint = request.args.get("endpoint", "")

        def accept(ev: dict[str, Any]) -> bool:
            if wanted and ev.get("type") != wanted:
                return False
            if not wanted and ev.get("type") == "trace":
                return False  # traces only when asked for
            return not endpoint or str(ev.get("endpoint", "")).startswith(endpoint)

        release = streams.take()  # 503 past the bound

        def generate() -> Iterator[str]:
            with contextlib.ExitStack() as stack:
                stack.callback(release)  # however the stream ends (werkzeug may not close it: GC does)
                if wanted == "trace":
                    tracers.start()
                    stack.callback(tracers.stop)
                if wanted in ("", "verdict"):
                    verdicts.start()
                    stack.callback(verdicts.stop)
                yield json.dumps({"type": "hello", "time": time.time()}) + "\n"
                for ev in hub.stream(accept):
                    yield "\n" if ev is None else json.dumps(ev) + "\n"

        response = Response(generate(), mimetype="application/x-ndjson")
        response.call_on_close(release)  # a stream closed before it started
        return response

    return app
