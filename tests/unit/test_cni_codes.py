"""plugin.cni.codes: the one table from the error tree to CNI codes, used by agent and binary."""

from __future__ import annotations

import pytest

from datapath.errors import AddressExhausted, CellgateError, Conflict, InvalidRequest, KernelError, NotFound
from plugin.cni import codes


@pytest.mark.parametrize(("exc", "code"), [
    (InvalidRequest("x"), codes.INVALID_CONFIG),
    (NotFound("x"), codes.UNKNOWN_CONTAINER),
    (Conflict("x"), codes.IO_FAILURE),
    (AddressExhausted("x"), codes.IO_FAILURE),
    (KernelError("x"), codes.IO_FAILURE),
    (InvalidRequest("x", cni_code=codes.INVALID_ENV), codes.INVALID_ENV),
    (Conflict("x", cni_code=codes.INTERFACE_EXISTS), codes.INTERFACE_EXISTS),
])
def test_code_of_an_error_is_its_explicit_code_else_its_class(exc: CellgateError, code: int) -> None:
    assert codes.code_of(exc) == code


def test_the_binary_reads_the_same_table_by_status() -> None:
    for exc in (InvalidRequest("x"), NotFound("x"), Conflict("x"), KernelError("x")):
        assert codes.code_for_status(exc.status) == codes.code_of(exc)
    assert codes.code_for_status(400, codes.INTERFACE_EXISTS) == codes.INTERFACE_EXISTS
    assert codes.code_for_status(413) == codes.IO_FAILURE


def test_an_explicit_code_is_the_errors_own() -> None:
    assert InvalidRequest("x").cni_code == 0
    assert InvalidRequest("x", cni_code=4).cni_code == 4
    assert str(InvalidRequest("bad", cni_code=4)) == "bad"
