"""The one error tree of cellgate. Standard library only; every package may raise these.

Edges translate them once: the Docker edge into `status` + {"Err"}, the REST edge into a JSON
problem with `status`, the CNI edge into a CNI error code (plugin.cni.codes: by class, or the
error's explicit `cni_code`), the CLI into a message and exit code.
"""

from __future__ import annotations


class CellgateError(Exception):
    """Base of every error cellgate raises on purpose."""

    status = 500  # the HTTP status every HTTP edge (Docker, REST) answers with
    cni_code = 0  # an explicit CNI error code for this error; 0: by class (plugin.cni.codes)

    def __init__(self, *args: object, cni_code: int = 0) -> None:
        super().__init__(*args)
        if cni_code:
            self.cni_code = cni_code


class InvalidRequest(CellgateError):
    """The caller sent something malformed or unsupported; nothing was changed."""

    status = 400


class NotFound(CellgateError):
    status = 404


class Conflict(CellgateError):
    """The request clashes with existing state (overlap, in use, already exists)."""

    status = 409


class AddressExhausted(CellgateError):
    status = 507


class StateError(CellgateError):
    """Persisting state failed (disk full, permissions); the change was rolled back."""

    status = 507


class KernelError(CellgateError):
    """A netlink, tc or BPF operation failed; the original exception is the __cause__."""

    status = 500
