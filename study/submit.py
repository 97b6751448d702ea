"""``mannstudy sweep FILE --submit``: the sweep's driver as a Ray Job on the cluster, so it outlives the shell.

The job is what ``ray job submit --no-wait --working-dir DIR -- mannstudy sweep FILE`` sends, through
Ray's own client (``ray.job_submission.JobSubmissionClient``, the dashboard's HTTP API):

- the study file alone is uploaded, as the job's working directory (the rest of the local folder stays
  here); the entrypoint names it by its file name;
- the driver runs on the head, inside Ray: it joins the cluster through ``$RAY_ADDRESS`` and takes the
  record's locations from the cluster's environment or ``~/mannstudy.env`` (study/spec.py), as a
  KubeRay ``RayJob`` does;
- the command returns once the job is accepted and prints how to follow, stop and resume it.

``--address`` is then the dashboard's address (``http://127.0.0.1:8265`` once ``ray dashboard
cluster.yaml`` forwards it; default ``$RAY_ADDRESS``, else that one).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import study.ray_env  # noqa: F401  (Ray's environment, before this module's functions import ray)

DASHBOARD = "http://127.0.0.1:8265"  # where `ray dashboard cluster.yaml` forwards the head's dashboard


class SubmitError(RuntimeError):
    """A job that cannot be submitted (one line, exit code 2)."""


class JobRequest(NamedTuple):
    """What is sent to the cluster: the shell command the job runs, and the folder uploaded as its working dir."""

    entrypoint: str
    working_dir: Path


def job_request(path: str | os.PathLike, resume: bool, folder: Path) -> JobRequest:
    """The job for ``mannstudy sweep path [--resume]``: ``path`` copied alone into ``folder`` (uploaded)."""
    study = Path(path)
    if not study.is_file():
        raise SubmitError(f"{path}: no such study file")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study, folder / study.name)
    entrypoint = shlex.join(["mannstudy", "sweep", study.name, *(["--resume"] if resume else [])])
    return JobRequest(entrypoint, folder)


def dashboard_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DASHBOARD


def submit_sweep(path: str | os.PathLike, address: str | None, resume: bool) -> str:
    """Submit the sweep as a Ray Job to the cluster whose dashboard is at ``address``; return the job's id."""
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    with tempfile.TemporaryDirectory(prefix="mannstudy-job-") as tmp:
        request = job_request(path, resume, Path(tmp) / "study")
        try:
            client = JobSubmissionClient(address)
            return client.submit_job(entrypoint=request.entrypoint,
                                     runtime_env={"working_dir": str(request.working_dir)})
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SubmitError(f"{path}: --submit: the Ray dashboard at {address} did not take the job ({first}); "
                              "is the cluster up and its dashboard forwarded (ray dashboard cluster.yaml)?") from None


def cli_submit(path: str, address: str | None, resume: bool) -> int:
    job = submit_sweep(path, address, resume)
    where = f"--address {dashboard_address(address)}"
    print(f"submitted: job {job} runs `mannstudy sweep {Path(path).name}{' --resume' if resume else ''}` on the "
          "cluster")
    print(f"follow:    ray job logs {where} -f {job}   (Ctrl-C leaves the job running)")
    print(f"stop:      ray job stop {where} {job}   (then --resume --submit finishes the study)")
    return 0
