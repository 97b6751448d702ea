"""Retake docs/img/mlflow-runs.png: the MLflow runs view of a study, as ``mannstudy ui`` serves and prints it.

    .venv/bin/python docs/screenshot.py results/demo                # after `make demo`
    .venv/bin/python docs/screenshot.py RESULTS --out FILE.png --port 5077

Starts ``mannstudy ui RESULTS`` (its own process group), waits until the server answers, opens the URL it
printed in headless Chromium (Debian: ``apt-get install chromium``) with a fresh profile, lets the page render
(the UI is a single-page app: ``--virtual-time-budget``), writes the PNG and stops the server with SIGTERM.
A fresh profile is what a first visit looks like: MLflow 3 opens its Assistant panel on the right once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", help="a study's results folder (holding mlflow.db), e.g. results/demo")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "mlflow-runs.png"))
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("--render-ms", type=int, default=15000, help="virtual time the page gets to render")
    args = parser.parse_args(argv)

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("screenshot: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    mannstudy = [sys.executable, "-m", "study.cli", "ui", args.results_dir, "--port", str(args.port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ui = subprocess.Popen(mannstudy, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = ui.stdout.readline().strip()  # "MLflow UI: <runs url>  (Ctrl+C to stop)"
        if not first.startswith("MLflow UI: "):
            print(f"screenshot: mannstudy ui printed {first!r}", file=sys.stderr)
            return 1
        url = first.removeprefix("MLflow UI: ").split()[0]
        base = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 180
        while not healthy(base):
            if ui.poll() is not None or time.monotonic() > deadline:
                print("screenshot: the MLflow server did not come up", file=sys.stderr)
                return 1
            time.sleep(0.5)
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mannstudy-chromium-") as profile:
            subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                            f"--window-size={args.size}", f"--virtual-time-budget={args.render_ms}", url],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=True)
        print(f"screenshot: {out} ({url})")
        return 0
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)  # mannstudy ui ends its whole server
            ui.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
