"""``python -m study.reaper KEY VALUE``: end a local Ray's processes once the driver that started it has gone.

Started by :func:`study.sweep.connect_ray` in a session of its own, with a pipe from the driver on its
stdin. The pipe closes when the driver shuts Ray down or dies (a SIGKILL included); then every process of
this user whose environment holds ``KEY=VALUE`` (the driver's mark, inherited by every process of that
Ray: GCS, raylet, agents, workers) gets SIGTERM, and SIGKILL a few seconds later if still there.
No imports beyond the standard library: it starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

GRACE_S = 5.0  # between SIGTERM and SIGKILL


def marked(key: str, value: str) -> list[int]:
    """Pids of this user's processes (this one excepted) whose environment holds ``key=value``."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def reap(key: str, value: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the marked processes, then SIGKILL those left after ``grace_s``; repeat until none is found
    (a raylet may start a worker meanwhile). Returns every pid signalled."""
    ended: list[int] = []
    deadline = time.monotonic() + 4 * grace_s
    while time.monotonic() < deadline:
        pids = marked(key, value)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        ended += pids
        wait_until = time.monotonic() + grace_s
        while time.monotonic() < wait_until and marked(key, value):
            time.sleep(0.2)
        for pid in marked(key, value):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return ended


def main(argv: list[str]) -> int:
    key, value = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not end the reaper first
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()  # returns when the driver closes the pipe or dies
    reap(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
