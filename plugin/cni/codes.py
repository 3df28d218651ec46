"""CNI error codes, the binary's CniError, and the one table from cellgate's error tree to them. Standard library only.

Both sides use it: the agent's CNI routes put `code_of(error)` in their problems, and the
`cellgate-cni` binary (run with `python -IS`) falls back on `code_for_status` when an answer
carries none (an HTTP error of the server itself).
"""

from __future__ import annotations

from datapath.errors import CellgateError, InvalidRequest, NotFound

# Well-known CNI error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
PLUGIN_NOT_AVAILABLE = 50
INTERFACE_EXISTS = 100  # plugin-specific: CNI_IFNAME already exists in the namespace
INTERNAL = 999  # plugin-specific: a bug in the plugin; the message says what failed



class CniError(Exception):
    """The binary's own error: what it prints as {cniVersion, code, msg, details}."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# An error without an explicit code gets the code of its class; anything else is an I/O failure.
BY_CLASS: tuple[tuple[type[CellgateError], int], ...] = (
    (NotFound, UNKNOWN_CONTAINER),
    (InvalidRequest, INVALID_CONFIG),
)
DEFAULT = IO_FAILURE
BY_STATUS = {cls.status: code for cls, code in BY_CLASS}


def code_of(exc: CellgateError) -> int:
    """The CNI code of an error: its explicit one, else its class's."""
    if exc.cni_code:
        return exc.cni_code
    return next((code for cls, code in BY_CLASS if isinstance(exc, cls)), DEFAULT)


def code_for_status(status: int, explicit: int = 0) -> int:
    """What the binary makes of a failed answer: the code the agent sent, else by the HTTP status."""
    return explicit or BY_STATUS.get(status, DEFAULT)
