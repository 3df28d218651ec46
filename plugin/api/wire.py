"""The REST API's wire: the one JSON body reader of every REST and CNI route, and replies.

Our own format: a body is a JSON object (empty = {}), NaN and Infinity are refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from flask import Response, request

from datapath.errors import InvalidRequest

_CONSTANT = re.compile(rb"-?\bInfinity\b|\bNaN\b")


def read_body() -> dict[str, Any]:
    """The request's JSON object; InvalidRequest names what is wrong with it."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)  # strict JSON: NaN and Infinity are refused, as is nesting past 1024
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise InvalidRequest("the request body is nested too deeply to be decoded") from None
        constant = _CONSTANT.search(raw)
        named = f"{constant.group().decode()} is not valid JSON; " if constant else ""
        raise InvalidRequest(f"malformed JSON: {named}{exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def reply(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, indent=None), status=status, mimetype="application/json")


def problem(message: str, status: int, **extra: Any) -> Response:
    """A JSON problem: {"error": ..., "status": N, ...} with that HTTP status."""
    return reply({"error": message, "status": status, **extra}, status)
