"""The dependency rule and the import-has-no-effects rule of STYLE.md, checked mechanically."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = ("ipam", "datapath")
ALLOWED = set(sys.stdlib_module_names) | set(PURE_PACKAGES)


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "kernel" not in p.relative_to(ROOT).parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            roots.add(node.module.split(".")[0])
    return roots


PURE_MODULES = [p for pkg in PURE_PACKAGES for p in _modules(pkg)]


def test_pure_packages_were_found() -> None:
    names = {_module_name(p) for p in PURE_MODULES}
    assert {"ipam.allocator", "ipam.pool", "ipam.store", "datapath.plan", "datapath.fake"} <= names
    assert not any(n.startswith("datapath.kernel") for n in names)


@pytest.mark.parametrize("path", PURE_MODULES, ids=_module_name)
def test_pure_module_imports_only_stdlib_and_pure_packages(path: Path) -> None:
    foreign = _imported_roots(path) - ALLOWED
    assert not foreign, f"{_module_name(path)} imports {sorted(foreign)}"


def test_the_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom pyroute2 import IPRoute\nimport flask.json\nfrom . import sibling\n")
    assert _imported_roots(bad) - ALLOWED == {"pyroute2", "flask"}


ALL_MODULES = sorted(
    _module_name(p)
    for pkg in ("plugin", "ipam", "datapath")
    for p in (ROOT / pkg).rglob("*.py")
    if not _module_name(p).startswith("datapath.kernel")
)

# Runs in a fresh interpreter so that nothing imported by pytest or other tests hides an effect.
_PROBE = """
import importlib, json, logging, os, signal, sys, threading
def fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return sorted(out)
def state():
    fds_now = fds()
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "sockets": [fd for fd in fds_now if fd.startswith("socket:")],
        "fds": len(fds_now),
        "root_handlers": len(logging.getLogger().handlers),
        "root_level": logging.getLogger().level,
        "sigterm": repr(signal.getsignal(signal.SIGTERM)),
        "kernel_imported": sorted(m for m in sys.modules if m.startswith(("datapath.kernel", "bcc", "pyroute2"))),
    }
before = state()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": state()}))
"""


def _probe(modules: list[str], path: Path = ROOT) -> tuple[dict[str, Any], dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], cwd=path, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    return result["before"], result["after"]


def _effects(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {key for key in before if before[key] != after[key]}


def test_importing_every_module_has_no_side_effects() -> None:
    assert "plugin.bootstrap" in ALL_MODULES and "plugin.docker.app" in ALL_MODULES
    before, after = _probe(ALL_MODULES)
    assert _effects(before, after) == set(), (before, after)
    assert after["kernel_imported"] == [], "importing the agent pulled in the kernel adapter"


def test_the_probe_sees_import_time_effects(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(
        "import logging, socket, threading\n"
        "logging.basicConfig()\n"
        "SOCK = socket.socket(socket.AF_UNIX)\n"
        "threading.Thread(target=threading.Event().wait, name='noisy', daemon=True).start()\n"
    )
    before, after = _probe(["noisy"], tmp_path)
    assert _effects(before, after) >= {"threads", "sockets", "fds", "root_handlers"}
