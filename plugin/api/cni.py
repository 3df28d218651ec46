"""REST blueprint of CNI: the routes the `cellgate-cni` binary calls.

Errors carry the CNI error code for the binary (`cni_code`, from the one table in
plugin.cni.codes), next to the HTTP status every REST problem has.
"""

from __future__ import annotations

from flask import Blueprint, Response

from datapath.errors import CellgateError
from plugin.api.context import ctx
from plugin.api.wire import problem, read_body, reply
from plugin.cni import codes
from plugin.cni.messages import AddRequest, Attachment, GcRequest
from plugin.service.cni import CniService

cni = Blueprint("cni", __name__)


def _service() -> CniService:
    service = ctx().cni
    assert service is not None  # the blueprint is registered only with a CNI service
    return service


@cni.errorhandler(CellgateError)
def cni_error(exc: CellgateError) -> Response:
    return problem(str(exc), exc.status, cni_code=codes.code_of(exc))


@cni.post("/v1/cni/add")
def cni_add() -> Response:
    return reply(_service().add(AddRequest.parse(read_body())))


@cni.post("/v1/cni/del")
def cni_del() -> Response:
    return reply({"removed": _service().delete(Attachment.parse(read_body(), netns_required=False))})


@cni.post("/v1/cni/check")
def cni_check() -> Response:
    _service().check(Attachment.parse(read_body(), netns_required=True))
    return reply({"ok": True})


@cni.post("/v1/cni/gc")
def cni_gc() -> Response:
    return reply({"removed": _service().gc(GcRequest.parse(read_body()))})


@cni.post("/v1/cni/status")
def cni_status() -> Response:
    read_body()  # what the binary sends says nothing more, but it must be a JSON object
    return reply({"ok": True, "endpoints": ctx().agent.endpoint_count()})
