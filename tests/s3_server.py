"""A local S3-protocol server for tests: moto's standalone server (``moto[server]``) on 127.0.0.1.

Clients reach it as they reach AWS, with an endpoint override: boto3 through ``AWS_ENDPOINT_URL``,
pyarrow's S3 filesystem (what Ray Tune uses for an ``s3://`` storage path) through
``AWS_ENDPOINT_URL_S3`` or ``endpoint_override``. Credentials are dummies; moto accepts any.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow_server import free_port

# What a client process needs to use the server instead of AWS (region: moto's default).
CLIENT_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """``moto_server`` in its own process group; ``start_s``: seconds until it answers HTTP."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables that point boto3 and pyarrow at this server."""
        return {**CLIENT_ENV, "AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url}

    def start(self, timeout_s: float = 60.0) -> S3Server:
        t0 = time.monotonic()
        with open(self.workdir / "moto.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **CLIENT_ENV})
        while time.monotonic() - t0 < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited: {(self.workdir / 'moto.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=1.0):
                    self.start_s = time.monotonic() - t0
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server not answering after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
            self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
