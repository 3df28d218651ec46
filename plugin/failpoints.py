"""Named crash and error points for tests; the mechanism lives in datapath.failpoints so
that the kernel adapter can mark its points too. See there for CELLGATE_FAILPOINTS."""

from __future__ import annotations

from datapath.failpoints import hit

__all__ = ["hit"]
