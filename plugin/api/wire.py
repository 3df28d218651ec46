"""The REST API's wire: the one JSON body reader of every REST and CNI route, and replies.

Our own format: a body is a JSON object (empty = {}), NaN and Infinity are refused.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, request

from datapath.errors import InvalidRequest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_body() -> dict[str, Any]:
    """The request's JSON object; InvalidRequest names what is wrong with it."""
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


def reply(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, indent=None), status=status, mimetype="application/json")


def problem(message: str, status: int, **extra: Any) -> Response:
    """A JSON problem: {"error": ..., "status": N, ...} with that HTTP status."""
    return reply({"error": message, "status": status, **extra}, status)
