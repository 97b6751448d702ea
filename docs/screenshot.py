"""Retake the pictures in docs/img/: the MLflow runs view of a study, as ``mannstudy ui`` serves and prints it,
and a study's HTML report as a browser shows it.

    .venv/bin/python docs/screenshot.py results/demo                # after `make demo`: docs/img/mlflow-runs.png
    .venv/bin/python docs/screenshot.py RESULTS --out FILE.png --port 5077
    .venv/bin/python docs/screenshot.py docs/demo-report/report.html --out docs/img/report.png
    .venv/bin/python docs/screenshot.py docs/demo-report/report.html#arms --out docs/img/report-arms.png

A results folder: starts ``mannstudy ui RESULTS`` (its own process group), waits until the server answers,
opens the URL it printed in headless Chromium (Debian: ``apt-get install chromium``) with a fresh profile, lets
the page render (the UI is a single-page app: ``--virtual-time-budget``), writes the PNG and stops the server
with SIGTERM. A fresh profile is what a first visit looks like: MLflow 3 opens its Assistant panel on the right
once. A report (``.html``): its top, or with ``#section`` that section alone (a copy of the page that holds
only it: headless Chromium does not scroll to an anchor before the capture); blank rows below the page's end
are cut off.
"""

from __future__ import annotations

import argparse
import os
import re
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
    parser.add_argument("results_dir", help="a study's results folder (holding mlflow.db), e.g. results/demo; or a "
                                            "report's HTML file, with #section to scroll to it")
    parser.add_argument("--out", default=None, help="the PNG (default: docs/img/mlflow-runs.png, docs/img/report.png)")
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("--render-ms", type=int, default=15000, help="virtual time the page gets to render")
    args = parser.parse_args(argv)

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("screenshot: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    page, _, section = args.results_dir.partition("#")
    if page.endswith(".html"):
        if not Path(page).is_file():
            print(f"screenshot: {page}: no such report", file=sys.stderr)
            return 2
        out = Path(args.out or ROOT / "docs" / "img" / "report.png")
        with tempfile.TemporaryDirectory(prefix="mannstudy-report-") as tmp:
            if section:
                text = Path(page).read_text(encoding="utf-8")
                found = re.search(rf'<section id="{re.escape(section)}">.*?</section>', text, re.DOTALL)
                if found is None:
                    print(f"screenshot: {page}: no section {section!r}", file=sys.stderr)
                    return 2
                head = text[: text.index("<body>") + len("<body>")]
                page = str(Path(tmp) / "section.html")
                Path(page).write_text(head + found[0] + "</body></html>", encoding="utf-8")
            code = shoot(browser, Path(page).resolve().as_uri(), out, args.size, args.render_ms)
        trim(out)
        return code
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
        return shoot(browser, url, Path(args.out or ROOT / "docs" / "img" / "mlflow-runs.png"), args.size,
                     args.render_ms)
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)  # mannstudy ui ends its whole server
            ui.wait(timeout=60)


def shoot(browser: str, url: str, out: Path, size: str, render_ms: int) -> int:
    """Headless Chromium, a fresh profile: ``url`` -> the PNG ``out`` of a ``size`` ("width,height") window."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mannstudy-chromium-") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                        f"--window-size={size}", f"--virtual-time-budget={render_ms}", url],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=True)
    print(f"screenshot: {out} ({url})")
    return 0


def trim(png: Path, margin: int = 16) -> None:
    """Cut the white rows below the page's content (a window taller than the page leaves them)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))
    inked = np.flatnonzero((pixels < 250).any(axis=1))
    if len(inked) and inked[-1] + margin < pixels.shape[0]:
        Image.open(png).crop((0, 0, pixels.shape[1], int(inked[-1]) + margin)).save(png)


if __name__ == "__main__":
    sys.exit(main())
