"""Install the `cellgate-cni` launcher into a CNI plugin directory (e.g. /opt/cni/bin).

The launcher runs the system Python with -IS (no site, no venv): the plugin imports
only the standard library and this source tree, which keeps every call fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ipam.store import write_atomic

NAME = "cellgate-cni"


def launcher(python: str = "/usr/bin/python3") -> str:
    root = Path(__file__).resolve().parents[2]
    return (
        f"#!{python} -IS\n"
        "# cellgate CNI plugin launcher (written by `cellgate install-cni` / the agent)\n"
        f"import sys\nsys.path.insert(0, {str(root)!r})\n"
        "from plugin.cni.main import main\n"
        "sys.exit(main())\n"
    )


def install(directory: Path, python: str = "") -> tuple[Path, bool]:
    """Write the launcher if it is missing or different; (path, whether it changed)."""
    python = python or ("/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable)
    target = directory / NAME
    text = launcher(python)
    try:
        if target.read_text() == text:
            return target, False
    except OSError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text.encode())
    os.chmod(target, 0o755)
    return target, True
