"""Session-wide fixtures for the sweep's integration and fault tests (tests/test_sweep.py, tests/test_faults.py).

One private Ray for the whole session (a ``ray.init`` + shutdown per test costs seconds): a real
``ray.cluster_utils.Cluster`` whose head node has 2 CPUs, so the node-loss test can add and remove a
worker node on the same instance. Its temporary folder is private (``RAY_TMPDIR``): a plain
``ray.init()`` elsewhere on the machine never attaches to it, and every process it started can be
found and ended by that folder when the session ends.

Study files live in tests/studies/; :func:`study_file` copies one into a test's folder with its
``results_dir`` there (and any key changed), so each sweep has its own MLflow and Optuna databases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml

STUDIES = Path(__file__).resolve().parent / "studies"
REPO = STUDIES.parent.parent

# The same value in every process of a test cluster (a head with token auth refuses a worker without).
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    "OMP_NUM_THREADS": "1",
}
# A study's defaults come from these when set (study/spec.py); tests want the study file's own values.
STUDY_ENV = ("MLFLOW_TRACKING_URI", "MANNSTUDY_STORAGE", "MANNSTUDY_RESULTS_DIR")
ENV_FILE_OFF = {"MANNSTUDY_ENV_FILE": ""}  # nor from a ~/mannstudy.env on the test machine


def pytest_sessionstart(session):
    """Build mann/csrc's kernels (or find them built) before any test: ~35 s once per machine, paid here rather
    than inside whichever test, or Ray worker, first runs an NTM on the CPU."""
    from mann import native

    native.prepare()


# ------------------------------------------------------------------------------------------------ processes


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of this user's processes whose environment has ``key=value`` (a private RAY_TMPDIR marks every
    process one Ray instance started, whichever process group or session it moved to)."""
    from study.reaper import marked

    return marked(key, value)


def kill_pids(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGKILL these processes (by id) and wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):  # reap our own children
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


def end_ray_folder(path: str, timeout_s: float = 30.0) -> list[int]:
    """End every process marked with ``RAY_TMPDIR=path`` and remove the folder; return the pids ended.

    Repeats until a scan finds nothing twice in a row: a Ray process may be starting a worker at the
    moment of a kill, and a process left alive writes into the folder after it was removed.
    """
    ended, quiet = [], 0
    deadline = time.monotonic() + timeout_s
    while quiet < 2 and time.monotonic() < deadline:
        pids = processes_with_env("RAY_TMPDIR", path)
        kill_pids(pids)
        ended += pids
        quiet = 0 if pids else quiet + 1
        time.sleep(0.2)
    shutil.rmtree(path, ignore_errors=True)
    return ended


def kill_group(pgid: int) -> None:
    """SIGKILL a whole process group (a driver started with ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def sigint_reaches_children():
    """SIGINT at its default in the processes this test starts, as for a terminal's foreground job.

    A shell without job control starts a background command (``make test &`` in a script, a CI runner's
    step) with SIGINT ignored; the test process and every process it starts inherit that, and a Ctrl+C
    test would then check nothing. Python's own handler here makes the children start with SIGINT's default.
    """
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is not None:  # None: a handler installed outside Python, which is left as it is
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def ray_tmpdir():
    """A private, short Ray temp folder (Ray's socket paths must stay under ~107 characters)."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    end_ray_folder(path)


@pytest.fixture(scope="session")
def ray_env(ray_tmpdir):
    """The environment every Ray process of the session inherits (set before the first Ray process starts).
    A study's defaults come from STUDY_ENV when set (study/spec.py); these tests want the files' own values."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**RAY_TEST_ENV, **ENV_FILE_OFF, "RAY_TMPDIR": ray_tmpdir}.items():
            mp.setenv(key, value)
        for key in STUDY_ENV:
            mp.delenv(key, raising=False)
        yield dict(os.environ)


@pytest.fixture(scope="session")
def ray_cluster(ray_env):
    """The session's Ray: a Cluster with a 2-CPU head, this process connected as its driver.

    ``run_sweep`` reuses an initialized Ray. Tests may add worker nodes; they must remove them.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("Ray is already initialized in this process; the sweep tests need their own cluster")
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def write_study(template: str, folder: Path, mlflow_db: Path | None = None, **changes) -> Path:
    """tests/studies/<template>.yaml copied into ``folder`` with ``results_dir`` there and top-level keys
    replaced (``budget={...}`` merges into the budget); returns the new file. ``mlflow_db``: a database to
    copy in as the study's MLflow store (see :func:`mlflow_template`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((STUDIES / f"{template}.yaml").read_text())
    for key, value in changes.items():
        if key == "budget":
            data["budget"] = {**data["budget"], **value}
        else:
            data[key] = value
    data.setdefault("results_dir", str(folder / "results"))
    if mlflow_db is not None:
        Path(data["results_dir"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(mlflow_db, Path(data["results_dir"]) / "mlflow.db")
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An MLflow SQLite database with its schema in place. Creating one runs MLflow's migrations (seconds on
    a busy 2-core machine), so each sweep starts from a copy, as tests/test_tracking.py does."""
    from study.tracking import prepare_experiment, resolve_tracking_uri

    folder = tmp_path_factory.mktemp("mlflow_template")
    prepare_experiment(resolve_tracking_uri(None, folder), "template")
    return folder / "mlflow.db"


@pytest.fixture(scope="session")
def study_file(ray_env, mlflow_template):
    """``study_file(template, folder, fresh=False, **changes)``: see :func:`write_study`; the study's MLflow
    database starts as a copy of the template unless ``fresh`` (then nothing exists before the sweep)."""

    def make(template: str, folder: Path, fresh: bool = False, **changes) -> Path:
        return write_study(template, folder, None if fresh else mlflow_template, **changes)

    return make


# ------------------------------------------------------------------------------------------------ records


class StudyRecord:
    """What a sweep left behind, read back from the real stores: the Optuna study, the MLflow runs, Tune's
    result.json of each trial."""

    def __init__(self, path: Path | str):
        from study.spec import load_spec
        from study.sweep import experiment_dir

        self.spec = load_spec(path)
        self.exp_dir = Path(experiment_dir(self.spec))  # a local results_dir

    # Optuna
    def trials(self):
        import optuna

        study = optuna.load_study(study_name=self.spec.name, storage=self.spec.storage)
        return study.get_trials(deepcopy=False)

    def by_tune_id(self):
        return {t.user_attrs["tune_trial_id"]: t for t in self.trials() if "tune_trial_id" in t.user_attrs}

    # MLflow
    @property
    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.spec.tracking_uri)

    def experiment_id(self) -> str:
        return self.client.get_experiment_by_name(self.spec.name).experiment_id

    def parents(self):
        from study.record import TAG_KIND, TAG_STUDY

        return self.client.search_runs(
            [self.experiment_id()], f"tags.`{TAG_KIND}` = 'study' and tags.`{TAG_STUDY}` = '{self.spec.name}'")

    def children(self):
        from study.record import TAG_KIND

        return self.client.search_runs([self.experiment_id()], f"tags.`{TAG_KIND}` = 'trial'", max_results=10_000)

    def history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        """(step, value, timestamp) of every point of ``key``, in step order."""
        points = self.client.get_metric_history(run_id, key)
        return sorted((m.step, m.value, m.timestamp) for m in points)

    # Tune
    def results(self) -> dict[str, list[dict]]:
        """Trial id -> every result Tune recorded for it (all attempts), in order."""
        out = {}
        for path in self.exp_dir.glob("*/result.json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rows:
                out[rows[0]["trial_id"]] = rows
        return out


@pytest.fixture(scope="session")
def record():
    """``record(study_file) -> StudyRecord``."""
    return StudyRecord
