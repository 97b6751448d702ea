"""A real ``mlflow server`` on loopback for tests: own process group, free port, clean stop.

Lightweight settings: ``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``
(~5 s and ~0.5 GB to start instead of ~17 s and ~3 GB). Ready when ``GET /health`` answers 200.
The same object can be stopped and started again on the same port and backend (a restart).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with a SQLite backend in ``workdir``; artifacts proxied into ``workdir/artifacts`` (or
    ``artifacts``, a URI such as ``s3://bucket/prefix``)."""

    def __init__(self, workdir: Path, port: int | None = None, backend_uri: str | None = None,
                 artifacts: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.backend_uri = backend_uri or f"sqlite:///{(self.workdir / 'server.db').resolve()}"
        self.artifacts = artifacts or str((self.workdir / "artifacts").resolve())
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", self.artifacts,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 60.0) -> MlflowServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log_file:
            # start_new_session: the server and its uvicorn worker form one group we can stop together
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.process = None
                raise RuntimeError(f"mlflow server exited during start; log tail:\n{tail}")
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s (log: {self.log_path})")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers; waits until the port is free."""
        if self.process is None:
            return
        pgid = self.process.pid  # a new session's leader: its pid is the group id
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)
        # the uvicorn worker may outlive the leader by a moment: wait for the whole group
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
