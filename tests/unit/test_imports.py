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
OURS = {"datapath", "ipam", "plugin"}
# The layers run one way: each package may import only itself and the packages below it.
LAYERS = {"datapath": {"datapath"}, "ipam": {"datapath", "ipam"}, "plugin": {"datapath", "ipam", "plugin"}}
# The CNI binary runs with `python -IS` (no site-packages): these import only the standard
# library and each other, and never the agent's API package.
CNI_BINARY = ("plugin.cni.main", "plugin.cni.validate", "plugin.cni.result", "plugin.cni.codes", "plugin.client")
CNI_BINARY_ALLOWED = set(sys.stdlib_module_names) | set(CNI_BINARY) | {"plugin", "plugin.cni", "datapath",
                                                                         "datapath.errors"}
# The doors call public use-case methods only: never the agent's lock or its adapters.
DOORS = ("plugin/docker", "plugin/api", "plugin/cni", "plugin/bootstrap.py")
PRIVATE_REACH = ("_lock", "ipam", "kernel", "policy", "_net_store", "_ep_store")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "kernel" not in p.relative_to(ROOT).parts)


def _all_modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            names.add(node.module)
    return names


def _imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported(path)}


PURE_MODULES = [p for pkg in PURE_PACKAGES for p in _modules(pkg)]
LAYERED_MODULES = [(pkg, p) for pkg in LAYERS for p in _all_modules(pkg)]


def test_pure_packages_were_found() -> None:
    names = {_module_name(p) for p in PURE_MODULES}
    assert {"ipam.allocator", "ipam.pool", "ipam.store", "datapath.plan", "datapath.fake",
            "datapath.store"} <= names
    assert not any(n.startswith("datapath.kernel") for n in names)


@pytest.mark.parametrize("path", PURE_MODULES, ids=_module_name)
def test_pure_module_imports_only_stdlib_and_pure_packages(path: Path) -> None:
    """No bcc, pyroute2, flask, docker, … in ipam/ or datapath/ outside kernel/."""
    foreign = _imported_roots(path) - ALLOWED
    assert not foreign, f"{_module_name(path)} imports {sorted(foreign)}"


@pytest.mark.parametrize(("package", "path"), LAYERED_MODULES, ids=lambda v: v if isinstance(v, str) else
                         _module_name(v))
def test_layers_import_only_downwards(package: str, path: Path) -> None:
    """datapath imports nothing of ours above it; ipam only datapath; plugin both."""
    upward = (_imported_roots(path) & OURS) - LAYERS[package]
    assert not upward, f"{_module_name(path)} ({package}) imports {sorted(upward)} above it"


@pytest.mark.parametrize("name", CNI_BINARY)
def test_the_cni_binary_imports_only_the_stdlib_and_itself(name: str) -> None:
    path = ROOT / (name.replace(".", "/") + ".py")
    foreign = {n for n in _imported(path) if n.split(".")[0] not in sys.stdlib_module_names} - CNI_BINARY_ALLOWED
    assert not foreign, f"{name} imports {sorted(foreign)} (it runs with python -IS)"


def test_the_cni_door_does_not_import_the_api_package() -> None:
    for path in _all_modules("plugin/cni"):
        assert not {n for n in _imported(path) if n.startswith("plugin.api")}, _module_name(path)


@pytest.mark.parametrize("path", _all_modules("plugin/service"), ids=_module_name)
def test_use_cases_import_no_door_and_no_web_framework(path: Path) -> None:
    """plugin/service may use the CNI door's request types and codes, never an app or a framework."""
    bad = {n for n in _imported(path)
           if n.split(".")[0] in {"flask", "werkzeug", "docker", "bcc", "pyroute2"}
           or n.startswith(("plugin.api", "plugin.docker", "plugin.bootstrap", "plugin.cni.main"))}
    assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


def _door_files() -> list[Path]:
    out: list[Path] = []
    for door in DOORS:
        target = ROOT / door
        out.extend([target] if target.is_file() else sorted(target.rglob("*.py")))
    return out


def _private_reaches(path: Path) -> list[str]:
    """`agent.<private or adapter>` anywhere in a file (`self.agent.x` included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_REACH:
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name == "agent":
                found.append(f"line {node.lineno}: agent.{node.attr}")
    return found


@pytest.mark.parametrize("path", _door_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doors_call_public_use_case_methods_only(path: Path) -> None:
    reaches = _private_reaches(path)
    assert not reaches, f"{path.relative_to(ROOT)} reaches into the agent: {reaches}"


def test_the_checker_sees_a_door_reaching_in(tmp_path: Path) -> None:
    bad = tmp_path / "door.py"
    bad.write_text("with agent._lock:\n    self.agent.ipam.release_pool(p)\n    agent.status()\n")
    assert _private_reaches(bad) == ["line 1: agent._lock", "line 2: agent.ipam"]


ALL_MODULES = sorted(
    _module_name(p)
    for pkg in ("plugin", "ipam", "datapath")
    for p in (ROOT / pkg).rglob("*.py")
    if not _module_name(p).startswith("datapath.kernel") and p.name != "__main__.py"  # entry points run
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
