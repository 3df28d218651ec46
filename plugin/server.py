"""Serve a WSGI app on a root-only unix socket (0600), threaded, and remove the socket on stop."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

from datapath.errors import Conflict, StateError

log = logging.getLogger(__name__)


def _in_use(path: Path) -> bool:
    """Whether something answers on `path` (a stale socket file from a crash does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            log.debug("probing %s: %s", path, exc)
        return False
    finally:
        probe.close()


class UnixServer:
    def __init__(self, path: Path, app: Any, name: str) -> None:
        self.path = path
        self.name = name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            if _in_use(path):
                raise Conflict(f"{path} is in use by another process; is another agent running?")
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise StateError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        old = os.umask(0o177)
        try:
            self.server: BaseWSGIServer = make_server(f"unix://{path}", 0, app, threaded=True)
        finally:
            os.umask(old)
        os.chown(path, 0, 0) if os.geteuid() == 0 else None
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"serve-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("%s listening on %s", self.name, self.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
