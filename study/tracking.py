"""MLflow tracking for sweeps: one parent run per study, one nested child run per trial, batched metrics.

Plain MLflow, no Ray: this module runs in the Tune driver and in trial processes, and is tested
without Ray. Every call goes through ``mlflow.MlflowClient`` with an explicit run id, never the
fluent ``mlflow.start_run`` state, because several trials may share one worker process.

Why not Ray's ``MLflowLoggerCallback``: it makes no parent run and sends one request per metric.
Here a trial buffers its metrics and sends them with ``log_batch`` (at most 1,000 a
request) every ``flush_every`` evaluations or ``flush_interval_s`` seconds.

The record's layout and vocabulary (run kinds, tags, statuses, artifact names) are :mod:`study.record`'s;
this module writes it, and every read of it goes through the functions here too (the analysis included),
so that MLflow's client, its paging and its internals are handled in one place.

Trial status -> MLflow run status (``STATUS_TO_RUN_STATUS``)::

    completed      FINISHED   ran its full budget
    stopped_early  FINISHED   stopped by the scheduler (ASHA) or the study's time budget before its
                              budget of steps (mannstudy.status_by: scheduler | time_budget): a decision
                              of the search, not a fault, so not KILLED (which the UI draws as a red
                              cross, like a crash); the tag mannstudy.status keeps the difference
    diverged       FAILED     NaN/Inf loss or gradients, at mannstudy.status_step
    failed         FAILED     an exception, in mannstudy.status_message

KILLED is left to a study run whose driver was interrupted (Ctrl+C).

A trial that is running (or being retried) carries ``mannstudy.status=running``.

Re-logging after a resume. MLflow keeps every point it is sent: the same (key, step) sent twice
with another timestamp or value becomes two points at one step (the curve doubles back), and
only a point identical in key, step, timestamp and value is stored once. So a tracker sends each
key's steps in increasing order only: it starts from the last step the run already holds per key
(``logged_steps``) and drops any point at or below it. A trial resumed from a checkpoint at step
S re-logs S+1.. up to where it crashed; those points are dropped (the first point at a step
wins) and the curve continues from the crash step.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.rest_utils import http_request, verify_rest_response
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from study.record import (
    EXPERIMENT_KIND,
    KIND_REPLICATION,
    KIND_STUDY,
    KIND_TRIAL,
    REPLICATION_FILE,
    RUNNING,
    SPEC_FILE,
    STATUS_TO_RUN_STATUS,
    SUMMARY_PREFIX,
    TAG_ATTEMPTS,
    TAG_EXPERIMENT_KIND,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_KIND,
    TAG_MODEL,
    TAG_NODE,
    TAG_NODE_IP,
    TAG_NOTE,
    TAG_PARENT,
    TAG_REPLICATION,
    TAG_REPLICATION_SEEDS,
    TAG_SEED,
    TAG_STATUS,
    TAG_STATUS_PREFIX,
    TAG_STOP,
    TAG_STUDY,
    TAG_STUDY_RUN,
    TAG_TRIAL_ID,
    TAG_VERSION_PREFIX,
    TAG_VIEW,
    VIEW_KEY,
)
from study.redact import redact, redact_values

log = logging.getLogger(__name__)

T = TypeVar("T")

VERSIONED_PACKAGES = ("torch", "ray", "optuna", "mlflow", "mannstudy")
_TRIAL_ID = re.compile(r"[A-Za-z0-9_.:\-]+")  # quoted into a search filter: no quotes or spaces
_TRUNCATED = "...[truncated]"


class TrackingError(RuntimeError):
    """A tracking problem the user must fix (unreachable server, bad URI); the message is one line."""


# ----------------------------------------------------------------------------------------------------------
# URIs and reachability


def resolve_tracking_uri(uri: str | None, results_dir: Path | str) -> str:
    """The tracking URI every process of a study uses.

    None -> ``sqlite:///<absolute results_dir>/mlflow.db``. A relative SQLite path is made absolute
    against the current directory (trials run in their own working directories). http(s) and
    database URIs pass through. MLflow 3 refuses plain file stores, so ``file:`` and bare paths
    are refused here with the forms that work (a bare ``*.db`` path is read as SQLite).
    """
    if uri is None or not str(uri).strip():
        return _sqlite_uri(Path(results_dir) / "mlflow.db")
    uri = str(uri).strip()
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise TrackingError(f"tracking URI {uri!r}: expected sqlite:///path/to/mlflow.db (a file, not in-memory)")
        path, _, query = uri[len("sqlite:///"):].partition("?")
        if not path or path == ":memory:":
            raise TrackingError(f"tracking URI {uri!r}: an in-memory database is not shared between trial processes")
        resolved = _sqlite_uri(Path(path))
        return resolved + (f"?{query}" if query else "")
    if scheme in ("http", "https"):
        return uri.rstrip("/")
    if scheme == "" and uri.endswith(".db"):
        return _sqlite_uri(Path(uri))
    if scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r}: expected sqlite:///path/to/mlflow.db or http(s)://host:port "
            "(MLflow 3 refuses plain file stores)"
        )
    return uri  # postgresql://, mysql://, databricks, ...: MLflow's own business


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.expanduser().resolve()}"  # absolute path -> four slashes


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].partition("?")[0])


def _is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError (one line naming ``uri``) unless the tracking store can be used.

    http(s): ``GET <uri>/health`` must answer; a refused connection, a timeout or a 5xx is an
    error (any other HTTP answer means a server is there). SQLite: the database's folder must be
    creatable and writable. Call it on the driver before any trial starts.
    """
    if _is_http(uri):
        url = f"{uri.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                response.read(256)
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise TrackingError(f"MLflow tracking server {uri} is unhealthy: GET /health gave {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {_one_line(reason)}") from None
        return
    path = _sqlite_path(uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"tracking URI {uri}: cannot create {path.parent}: {err.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: {path.parent} is not writable")


def _one_line(err: object, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Calls with our own retry policy

_HTTP_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _fail_fast(uri: str, request_timeout_s: float):
    """MLflow's HTTP client retries a refused connection with backoff for minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, factor 2): a trial would stall in ``log_batch``. We retry
    ourselves, between evaluations, so each request here is tried once with a short timeout.
    MLflow reads these variables at request time and has no per-client setting; the lock keeps
    two of our threads from restoring each other's values.
    """
    if not _is_http(uri):
        yield
        return
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(request_timeout_s))),
    }
    with _HTTP_ENV_LOCK:
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _is_permanent(err: BaseException) -> bool:
    """A request the server refused on its merits (bad value, deleted run, no permission): retrying
    cannot help. Everything else (refused connection, timeout, 5xx, 429, a locked SQLite file) is
    transient."""
    return isinstance(err, MlflowException) and err.get_http_status_code() in (400, 401, 403, 404)


def _retry(fn: Callable[[], T], uri: str, what: str, timeout_s: float, request_timeout_s: float = 10.0) -> T:
    """``fn()`` with exponential backoff on transient errors for up to ``timeout_s``; then TrackingError."""
    deadline = time.monotonic() + timeout_s
    delay = 0.25
    while True:
        try:
            with _fail_fast(uri, request_timeout_s):
                return fn()
        except Exception as err:
            if _is_permanent(err):
                raise TrackingError(f"MLflow at {uri}: {what} was refused: {_one_line(err)}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TrackingError(
                    f"MLflow at {uri}: {what} failed for {timeout_s:.0f} s: {_one_line(err)}"
                ) from None
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, 10.0)


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


# ----------------------------------------------------------------------------------------------------------
# Driver side: experiment and study (parent) run


def prepare_experiment(uri: str, name: str, artifact_root: Path | str | None = None, timeout_s: float = 30.0) -> str:
    """Get or create experiment ``name``; return its id. Run on the driver before trials start.

    Creating the experiment (and, for SQLite, the database) here avoids the race of two trials
    creating a fresh SQLite database at once (``duplicate column name``). ``artifact_root``: a folder or URI for
    the experiment's artifacts; None means ``<database folder>/artifacts`` for SQLite (otherwise
    MLflow would pick a folder relative to whichever process created it) and the server's own
    default (proxied ``mlflow-artifacts:``) for an http(s) server.
    """
    check_reachable(uri)
    if artifact_root is None and _sqlite_path(uri) is not None:
        artifact_root = _sqlite_path(uri).parent / "artifacts"
    location = None
    if artifact_root is not None:
        text = str(artifact_root)
        location = text if urlparse(text).scheme not in ("", "file") else Path(text).resolve().as_uri()
    client = _client(uri)

    def get_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow at {uri}: experiment {name!r} is deleted; restore it or use another name")
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # a kind the user chose in the UI stays
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id

    return _retry(get_or_create, uri, f"creating experiment {name!r}", timeout_s)


def find_study_run(uri: str, experiment_id: str, study_name: str, timeout_s: float = 30.0) -> str | None:
    """The parent run of ``study_name`` in the experiment, or None. The oldest wins if there are several."""
    client = _client(uri)
    filter_string = f"tags.`{TAG_KIND}` = '{KIND_STUDY}' AND tags.`{TAG_STUDY}` = '{_quote(study_name)}'"
    runs = _retry(
        lambda: client.search_runs([experiment_id], filter_string=filter_string, max_results=100),
        uri, f"searching the run of study {study_name!r}", timeout_s,
    )
    if not runs:
        return None
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def _quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise TrackingError(f"name {value!r}: expected no quotes or backslashes (it is used in MLflow searches)")
    return value


def start_study_run(
    uri: str,
    experiment_id: str,
    study_name: str,
    spec_dict: Mapping[str, Any],
    study_file: Path | str,
    extra_tags: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Get or create the parent run of a study; return its run id.

    New run: the spec as params (dotted keys, values cut to MLflow's 6,000 characters; the full
    spec is the ``spec.json`` artifact), the study file as an artifact, tags for the study, git
    commit and package versions, the spec's description as the run's description. The experiment's
    runs view (:func:`runs_view`) is stored each time. Existing run (a resumed sweep): reused and set RUNNING again,
    never duplicated; its params stay (MLflow params are immutable) and a changed spec is
    reported as a warning.
    """
    study_file = Path(study_file)
    if not study_file.is_file():
        raise TrackingError(f"{study_file}: study file not found (needed as the study run's artifact)")
    client = _client(uri)
    # Passwords of connection strings (storage, tracking_uri) never reach the record (study/redact.py).
    spec_dict = redact_values(dict(spec_dict))
    params = spec_params(spec_dict)
    tags = {TAG_KIND: KIND_STUDY, TAG_STUDY: study_name, **provenance_tags()}
    tags.update({str(k): _cut(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in (extra_tags or {}).items()})

    run_id = find_study_run(uri, experiment_id, study_name, timeout_s)
    if run_id is None:
        study_tags = {TAG_KIND: KIND_STUDY, TAG_STUDY: study_name}
        if spec_dict.get("description"):  # the run's description; log_study_summary adds the outcome
            study_tags[TAG_NOTE] = _cut(str(spec_dict["description"]), MAX_TAG_VAL_LENGTH)
        run = _retry(
            lambda: client.create_run(experiment_id, tags=study_tags, run_name=study_name),
            uri, f"creating the run of study {study_name!r}", timeout_s,
        )
        run_id = run.info.run_id
        param_list = [Param(k, v) for k, v in params.items()]
        _retry(lambda: client.log_batch(run_id, params=param_list, synchronous=True), uri, "logging study params",
               timeout_s)
    else:
        existing = _retry(lambda: client.get_run(run_id), uri, "reading the study run", timeout_s).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        missing = [Param(k, v) for k, v in params.items() if k not in existing]
        if changed:
            log.warning("study %s resumed with a changed spec; MLflow keeps the first values of: %s",
                        study_name, ", ".join(changed))
        if missing:
            _retry(lambda: client.log_batch(run_id, params=missing, synchronous=True), uri, "logging study params",
                   timeout_s)
        _retry(lambda: client.update_run(run_id, status="RUNNING"), uri, "reopening the study run", timeout_s)
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    _retry(lambda: client.log_batch(run_id, tags=tag_list, synchronous=True), uri, "tagging the study run", timeout_s)
    with tempfile.TemporaryDirectory(prefix="mannstudy-study-") as tmp:
        text = study_file.read_text()
        upload = study_file if redact(text) == text else Path(tmp) / study_file.name
        if upload != study_file:
            upload.write_text(redact(text))
        _retry(lambda: client.log_artifact(run_id, str(upload)), uri, f"uploading {study_file}", timeout_s)
    spec_json = json.loads(json.dumps(spec_dict, default=str))
    _retry(lambda: client.log_dict(run_id, spec_json, SPEC_FILE), uri, f"uploading {SPEC_FILE}", timeout_s)
    view = json.dumps(runs_view(spec_dict))
    _retry(lambda: client.set_experiment_tag(experiment_id, TAG_VIEW, view), uri, "storing the runs view", timeout_s)
    return run_id


def runs_view(spec_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The runs table of a study as the MLflow UI stores a shared view: the columns that say what each
    trial is and how it ended (its description: how it ended, or the study's outcome; the objective, the
    study's best, model, searched parameters, seed, status tag), best objective first. Column ids are
    MLflow's ``<type>.`<key>```."""
    objective = dict(spec_dict.get("objective") or {})
    metric, mode = objective.get("metric", "error"), objective.get("mode", "min")
    searched = [key for key in (spec_dict.get("search") or {}) if key not in ("model", "seed")]
    columns = ["attributes.`Description`", f"metrics.`{metric}`", f"metrics.`{SUMMARY_PREFIX}best_{metric}`",
               "params.`model`", *(f"params.`{key}`" for key in searched), "params.`seed`", f"tags.`{TAG_STATUS}`"]
    # The UI sets the widths of the columns its view orders: the run name and the description wide enough.
    widths = {"attributes.`Run Name`": 270, "attributes.`Description`": 250}
    return {"searchFilter": "", "orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
            "selectedColumns": columns, "columnOrder": list(widths), "columnWidths": widths}


def trial_run_name(params: Mapping[str, Any]) -> str:
    """A trial's run name: its model, searched values and seed, short (``ntm lr=3.2e-3 seed=1``).

    ``params``: Tune's trial config (``model``, ``seed``, the searched keys); a dotted key is named by its
    last part (``model.read_heads`` -> ``read_heads``)."""
    values = dict(params)
    model, seed = values.pop("model", None), values.pop("seed", None)
    parts = [str(model)] if model is not None else []
    parts += [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def _short(value: Any) -> str:
    """A number in at most two significant digits, exponent without padding (3.2e-3, 0.25, 1.5e+4)."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        if 1e-2 <= abs(value) < 1e4:
            return f"{value:.2g}"
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return str(value)


def log_study_summary(uri: str, run_id: str, counts: Mapping[str, int], wall_time_s: float,
                      objective: str, best: float | None = None, timeout_s: float = 30.0) -> None:
    """The study run's summary as metrics, logged when a sweep or replication ends: ``study.best_<objective>``
    (when a trial completed), ``study.trials_<status>`` for every status, ``study.trials`` and
    ``study.wall_time_s``: this session's seconds added to what the run already holds (a resumed sweep
    counts all its sessions). The run's description (``mlflow.note.content``) says the same in one line,
    then the study's own description (the runs table shows the first line)."""
    client = _client(uri)
    run = _retry(lambda: client.get_run(run_id), uri, "reading the study run", timeout_s)
    total_s = run.data.metrics.get(SUMMARY_PREFIX + "wall_time_s", 0.0) + wall_time_s
    values = {f"trials_{status}": n for status, n in counts.items()}
    values["trials"] = sum(counts.values())
    values["wall_time_s"] = round(total_s, 1)
    if best is not None and math.isfinite(best):
        values[f"best_{objective}"] = best
    now = int(time.time() * 1000)
    metrics = [Metric(SUMMARY_PREFIX + key, float(value), now, 0) for key, value in values.items()]
    done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    best_text = f"; best {objective} {best:.4g}" if best is not None and math.isfinite(best) else ""
    note = f"{values['trials']} trials ({done or 'none'}){best_text}; {total_s:.0f} s of wall time"
    description = run.data.params.get("description", "")
    tags = [RunTag(TAG_NOTE, _cut(f"{note}\n\n{description}" if description else note, MAX_TAG_VAL_LENGTH))]
    _retry(lambda: client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True), uri,
           "logging the study summary", timeout_s)


def finish_study_run(uri: str, run_id: str, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
    """End the parent run (FINISHED, FAILED or KILLED) when the sweep ends."""
    client = _client(uri)
    _retry(lambda: client.set_terminated(run_id, status=status), uri, "ending the study run", timeout_s)


def start_replication_run(uri: str, experiment_id: str, study_name: str, study_run_id: str, rep_id: str,
                          seeds: Iterable[int], record: Mapping[str, Any], timeout_s: float = 30.0) -> str:
    """Get or create the parent run of replication ``rep_id``, nested under the study's run; return its id.

    An existing run (a resumed replication; the oldest if there are several) is set RUNNING again. A new one
    gets the replication's tags and ``record`` (its configurations and seeds) as ``REPLICATION_FILE``.
    """
    client = _client(uri)
    filter_string = f"tags.`{TAG_KIND}` = '{KIND_REPLICATION}' AND tags.`{TAG_REPLICATION}` = '{rep_id}'"
    found = _retry(lambda: client.search_runs([experiment_id], filter_string=filter_string, max_results=10),
                   uri, f"searching replication {rep_id}", timeout_s)
    if found:
        run_id = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        _retry(lambda: client.update_run(run_id, status="RUNNING"), uri, "reopening the replication run", timeout_s)
        return run_id
    tags = {TAG_KIND: KIND_REPLICATION, TAG_REPLICATION: rep_id, TAG_STUDY: study_name, TAG_STUDY_RUN: study_run_id,
            TAG_PARENT: study_run_id, TAG_REPLICATION_SEEDS: json.dumps(list(seeds)), **provenance_tags()}
    run = _retry(lambda: client.create_run(experiment_id, tags=tags, run_name=rep_id), uri,
                 f"creating replication run {rep_id}", timeout_s)
    _retry(lambda: client.log_dict(run.info.run_id, json.loads(json.dumps(record, default=str)), REPLICATION_FILE),
           uri, f"uploading {REPLICATION_FILE}", timeout_s)
    return run.info.run_id


def spec_params(spec_dict: Mapping[str, Any]) -> dict[str, str]:
    """A nested spec as MLflow params: dotted keys (the one key namespace of the project), string
    values (lists as JSON), each cut to MLflow's limit of 6,000 characters."""
    from mann.config import flatten

    return {key: _param_value(value) for key, value in flatten(spec_dict).items()}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _cut(text, MAX_PARAM_VAL_LENGTH)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def provenance_tags() -> dict[str, str]:
    """Git commit of the mannstudy checkout (if it is one) and the versions of the packages that matter."""
    tags = {}
    for package in VERSIONED_PACKAGES:
        tags[TAG_VERSION_PREFIX + package] = _version(package)
    source = Path(__file__).resolve().parent.parent
    commit = _git(source, "rev-parse", "HEAD")
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no")
        tags[TAG_GIT_DIRTY] = "true" if dirty else "false"
    return tags


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package == "mannstudy":  # a source checkout that was not pip-installed
            import mann

            return mann.__version__
        return "not installed"


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def log_study_artifacts(uri: str, run_id: str, paths: Iterable[Path | str], artifact_path: str | None = None,
                        timeout_s: float = 60.0) -> None:
    """Upload files and folders (a report and its plots) to a run; a folder keeps its name."""
    client = _client(uri)
    for path in map(Path, paths):
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            _retry(lambda p=path, d=dest: client.log_artifacts(run_id, str(p), d), uri, f"uploading {path}", timeout_s)
        elif path.is_file():
            _retry(lambda p=path: client.log_artifact(run_id, str(p), artifact_path), uri, f"uploading {path}",
                   timeout_s)
        else:
            raise TrackingError(f"{path}: no such file or folder to log to run {run_id}")


def logged_steps(uri: str, run_id: str, timeout_s: float = 30.0) -> dict[str, int]:
    """The last step logged for each metric key of a run (empty for a run without metrics)."""
    client = _client(uri)

    def read() -> dict[str, int]:
        keys = client.get_run(run_id).data.metrics
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}

    return _retry(read, uri, f"reading the metrics of run {run_id}", timeout_s)


def last_logged_step(uri: str, run_id: str, timeout_s: float = 30.0) -> int | None:
    """The largest step any metric of the run reached, or None: where a resumed trial's curve continues."""
    steps = logged_steps(uri, run_id, timeout_s)
    return max(steps.values()) if steps else None


# ----------------------------------------------------------------------------------------------------------
# Reading the record
#
# Searches page through the runs PAGE_SIZE at a time (the most MLflow returns per page). Metric histories:
# ``MlflowClient`` has only ``get_metric_history(run, key)``, one request per run and key, so
# :func:`metric_histories` asks the store for the histories of many runs at once:
#
# - a database store (SQLite, PostgreSQL): ``get_metric_history_bulk`` of MLflow's SQLAlchemy store, one
#   query per metric key and 500 runs;
# - a tracking server: the bulk endpoint the MLflow UI draws its charts from, one request per metric key
#   and 100 runs (falling back to the public, slower ``get-history-bulk-interval``; see :func:`_rest_bulk`);
# - anything else: ``get_metric_history`` per run and key.
#
# ``method="per_run"`` forces the last. Measured on this project's 2-core machine (shared and busy: orders of
# magnitude only), 500 runs x 13 keys x 30 evaluations (195,000 points): SQLite, bulk 7-14 s vs per run 46 s;
# a local tracking server, the UI's bulk endpoint 15-22 s, get-history-bulk-interval 111 s, per run (6,500
# requests) 166-176 s. Listing the 500 runs (search_runs, one page) took 2-9 s.

PAGE_SIZE = 1000  # runs per search_runs page (MLflow's maximum)
SQL_CHUNK = 500  # run ids per bulk query (well under SQLite's bound-parameter limit)
REST_CHUNK = 100  # run ids per bulk request to a tracking server (the server's limit)
UI_MAX_POINTS = 25000  # points per get-history-bulk answer the server returns at most
REST_MAX_POINTS = 2500  # points per run and key get-history-bulk-interval returns at most (MAX_RESULTS_PER_RUN)
HISTORY_METHODS = ("auto", "bulk", "per_run")


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, or None when there is none."""
    experiment = _client(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def get_run(uri: str, run_id: str):
    """One run (``mlflow.entities.Run``: ``info``, ``data.tags``, ``data.params``, ``data.metrics``)."""
    return _client(uri).get_run(run_id)


def _search_all(client: mlflow.MlflowClient, experiment_id: str, filter_string: str,
                order_by: list[str] | None = None) -> list:
    """Every active run matching ``filter_string``, paging ``PAGE_SIZE`` at a time."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE_SIZE,
                                  page_token=token, order_by=order_by)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def runs_of_kind(uri: str, experiment_id: str, kind: str) -> list:
    """Every run of the experiment whose ``TAG_KIND`` is ``kind``, oldest first."""
    return _search_all(_client(uri), experiment_id, f"tags.`{TAG_KIND}` = '{kind}'", ["attributes.start_time ASC"])


def trial_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    """Every trial run nested under ``parent_run_id`` (a study's or a replication's run), in MLflow's order."""
    return _search_all(_client(uri), experiment_id,
                       f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND tags.`{TAG_KIND}` = '{KIND_TRIAL}'")


def _trial_filter(parent_run_id: str, trial_id: str) -> str:
    return f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND tags.`{TAG_TRIAL_ID}` = '{trial_id}'"


def find_trial_runs(uri: str, experiment_id: str, parent_run_id: str, trial_id: str, timeout_s: float = 60.0) -> list:
    """The runs of trial ``trial_id`` under ``parent_run_id``, oldest first (the first is the one
    :class:`TrialTracker` attaches to); retried as a tracker's own calls are."""
    client = _client(uri)
    runs = _retry(lambda: client.search_runs([experiment_id], filter_string=_trial_filter(parent_run_id, trial_id),
                                             max_results=100),
                  uri, f"reading the run of trial {trial_id}", timeout_s)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def read_artifact_text(uri: str, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of a run; MLflow's exception when the run has no such artifact or the
    store cannot serve it."""
    with tempfile.TemporaryDirectory(prefix="mannstudy-artifact-") as tmp:
        local = _client(uri).download_artifacts(run_id, path, tmp)
        return Path(local).read_text()


def metric_histories(uri: str, run_ids: Sequence[str], keys: Iterable[str],
                     method: str = "auto") -> list[tuple[str, str, int, float, int]]:
    """Every point of each metric ``key`` of each run, as ``(run_id, key, step, value, timestamp)`` rows.

    ``method``: "auto" (bulk when the store has a bulk call, see above), "bulk" (TrackingError when it has
    none), or "per_run" (``get_metric_history`` per run and key).
    """
    if method not in HISTORY_METHODS:
        raise ValueError(f"method: expected one of {', '.join(HISTORY_METHODS)}, got {method!r}")
    keys, run_ids = list(keys), list(run_ids)
    client = _client(uri)
    store = _store(client)
    rows: list[tuple] = []
    if method != "per_run" and hasattr(store, "get_metric_history_bulk"):  # SQLAlchemy store
        for key in keys:
            for chunk in _chunks(run_ids, SQL_CHUNK):
                for m in store.get_metric_history_bulk(chunk, key, max_results=None):
                    rows.append((m.run_id, key, m.step, m.value, m.timestamp))
    elif method != "per_run" and hasattr(store, "get_host_creds"):  # REST store: a tracking server
        for key in keys:
            for chunk in _chunks(run_ids, REST_CHUNK):
                rows.extend(_rest_bulk(client, store, chunk, key))
    elif method == "bulk":
        raise TrackingError(f"MLflow at {uri}: this store has no bulk metric-history call (use per_run)")
    else:
        for run_id in run_ids:
            for key in keys:
                rows.extend(_history(client, run_id, key))
    return rows


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple]:
    return [(run_id, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]


def _store(client: mlflow.MlflowClient):
    # MlflowClient keeps its store private; the bulk calls exist only there (the UI uses them).
    tracking = getattr(client, "_tracking_client", None)
    return getattr(tracking, "store", None)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _rest_bulk(client: mlflow.MlflowClient, store, run_ids: Sequence[str], key: str) -> list[tuple]:
    """One metric key of up to 100 runs from a tracking server, whole.

    First the endpoint MLflow's own UI draws its charts from (``/ajax-api/.../get-history-bulk``:
    one SQL query for all the runs, at most 25,000 points an answer: a full answer is split and
    asked again); a server that refuses it gets the public ``get-history-bulk-interval`` (one query
    per run, up to 2,500 points per run, a run with that many is fetched whole with
    ``get_metric_history``).
    """
    try:
        return _ui_bulk(client, store, list(run_ids), key)
    except MlflowException:
        return _interval_bulk(client, store, list(run_ids), key)


def _get(store, endpoint: str, params: dict) -> list[dict]:
    response = verify_rest_response(http_request(store.get_host_creds(), endpoint, "GET", params=params), endpoint)
    return response.json().get("metrics", [])


def _rows(points: list[dict], key: str) -> list[tuple]:
    return [(p["run_id"], key, int(p.get("step", 0)), float(p["value"]), int(p.get("timestamp", 0))) for p in points]


def _ui_bulk(client: mlflow.MlflowClient, store, run_ids: list[str], key: str) -> list[tuple]:
    params = {"run_id": run_ids, "metric_key": key, "max_results": UI_MAX_POINTS}
    points = _get(store, "/ajax-api/2.0/mlflow/metrics/get-history-bulk", params)
    if len(points) < UI_MAX_POINTS:
        return _rows(points, key)
    if len(run_ids) == 1:  # one run with that many points: page through it
        return _history(client, run_ids[0], key)
    half = len(run_ids) // 2
    return _ui_bulk(client, store, run_ids[:half], key) + _ui_bulk(client, store, run_ids[half:], key)


def _interval_bulk(client: mlflow.MlflowClient, store, run_ids: list[str], key: str) -> list[tuple]:
    params = {"run_ids": run_ids, "metric_key": key, "max_results": REST_MAX_POINTS}
    rows = _rows(_get(store, "/api/2.0/mlflow/metrics/get-history-bulk-interval", params), key)
    per_run = Counter(r[0] for r in rows)
    full = {run_id for run_id, n in per_run.items() if n >= REST_MAX_POINTS}
    if full:  # the server sampled these runs: fetch them whole
        rows = [r for r in rows if r[0] not in full]
        for run_id in full:
            rows.extend(_history(client, run_id, key))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Trial side


def warm_up(uri: str) -> None:
    """Have MLflow build and cache the store of ``uri`` in this process (for SQLite: SQLAlchemy, its schema
    check), so that a trial's first tracking call does not pay for it."""
    _client(uri)


def node_tags() -> dict[str, str]:
    """Host name and IP address of this process's node."""
    host = socket.gethostname()
    ip = "unknown"
    try:  # the address of the interface that routes outwards; a UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.254.254.254", 1))
            ip = probe.getsockname()[0]
    except OSError:
        with contextlib.suppress(OSError):
            ip = socket.gethostbyname(host)
    return {TAG_NODE: host, TAG_NODE_IP: ip}


class TrialTracker:
    """The nested child run of one trial: get-or-create by trial id, batched and buffered metrics, status.

    ``log_metrics`` never raises for an unreachable server: points stay in the buffer and are
    retried with exponential backoff at later flushes; ``flush``/``close``/``set_status`` retry for
    up to ``retry_timeout_s`` and then log a warning that says how many points were lost. One
    lock guards the buffer, so a callback thread and the training thread may share a tracker.

    Args:
        params: the trial's config as MLflow params (dotted keys); logged when the run is created,
            and any missing ones when a retried trial attaches to its run.
        tags: extra tags (e.g. the Ray trial name); ``seed`` and ``model`` in params also become
            ``mannstudy.seed`` / ``mannstudy.model`` tags for filtering in the UI, and the parent's
            ``mannstudy.study`` is copied so a trial run can be found by study name alone.
        run_name: the name the MLflow UI shows (:func:`trial_run_name`); default the trial id.
        flush_every: evaluations between sends.
        flush_interval_s: a send also happens at the first evaluation this long after the last one.
        retry_timeout_s: how long creating the run, the final flush and the status keep retrying.
        request_timeout_s: one HTTP request's timeout.
    """

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        trial_id: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        run_name: str | None = None,
        flush_every: int = 10,
        flush_interval_s: float = 30.0,
        retry_timeout_s: float = 60.0,
        request_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
    ):
        if not _TRIAL_ID.fullmatch(str(trial_id)):
            raise TrackingError(f"trial id {trial_id!r}: expected letters, digits and _ . : - only")
        if flush_every < 1:
            raise ValueError(f"flush_every: expected a positive integer, got {flush_every!r}")
        self.uri, self.experiment_id, self.parent_run_id, self.trial_id = uri, experiment_id, parent_run_id, trial_id
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self.retry_timeout_s, self.request_timeout_s = retry_timeout_s, request_timeout_s
        self.max_backoff_s = max_backoff_s
        self.run_name = run_name or trial_id
        self.client = _client(uri)
        self.status: str | None = None
        self.skipped = 0  # points not sent because their step was already logged (resume)
        self.refused = 0  # points the server refused on their merits (dropped with a warning)

        self._lock = threading.RLock()
        self._buffer: list[Metric] = []
        self._evals_since_flush = 0
        self._last_flush = time.monotonic()
        self._retry_at = 0.0  # monotonic time before which a non-blocking flush does not try
        self._delay = 0.5
        self._outage_since: float | None = None
        self._closed = False

        params = {str(k): _param_value(v) for k, v in (params or {}).items()}
        run_tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_ID: trial_id, TAG_STATUS: RUNNING, **node_tags()}
        for key, tag in (("seed", TAG_SEED), ("model", TAG_MODEL)):
            if key in params:
                run_tags[tag] = params[key]
        run_tags.update({str(k): _cut(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()})
        self.run_id, self.attached = self._get_or_create_run(params, run_tags)
        self._last_step: dict[str, int] = logged_steps(uri, self.run_id, retry_timeout_s) if self.attached else {}

    # -- run ---------------------------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return _retry(fn, self.uri, what, self.retry_timeout_s, self.request_timeout_s)

    def _find_children(self) -> list:
        filter_string = _trial_filter(self.parent_run_id, self.trial_id)
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _get_or_create_run(self, params: dict[str, str], run_tags: dict[str, str]) -> tuple[str, bool]:
        """(run id, attached): the trial's existing child run, or a new one.

        Two processes creating the same trial's run at once both see both runs on the second
        search; the oldest wins and the other process deletes its own.
        """
        what = f"get-or-create the run of trial {self.trial_id}"
        parent = self._retry(lambda: self.client.get_run(self.parent_run_id), f"reading run {self.parent_run_id}")
        if TAG_STUDY in parent.data.tags:
            run_tags.setdefault(TAG_STUDY, parent.data.tags[TAG_STUDY])
        children = self._retry(self._find_children, what)
        if children:
            return self._attach(children[0], params, run_tags), True
        created = self._retry(
            lambda: self.client.create_run(
                self.experiment_id, tags={TAG_PARENT: self.parent_run_id, TAG_TRIAL_ID: self.trial_id},
                run_name=self.run_name,
            ),
            what,
        )
        run_id = created.info.run_id
        winner = self._retry(self._find_children, what)[0]
        if winner.info.run_id != run_id:
            self._retry(lambda: self.client.delete_run(run_id), what)
            return self._attach(winner, params, run_tags), True
        run_tags[TAG_ATTEMPTS] = "1"
        self._retry(
            lambda: self.client.log_batch(
                run_id, params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in run_tags.items()], synchronous=True,
            ),
            f"logging the params of trial {self.trial_id}",
        )
        return run_id, False

    def _attach(self, run, params: dict[str, str], run_tags: dict[str, str]) -> str:
        """A retried or resumed trial: reopen its run, refresh node tags, clear the old status."""
        run_id = run.info.run_id
        old_tags = run.data.tags
        try:
            attempts = int(old_tags.get(TAG_ATTEMPTS, "1")) + 1
        except ValueError:
            attempts = 2
        run_tags[TAG_ATTEMPTS] = str(attempts)
        missing = [Param(k, v) for k, v in params.items() if k not in run.data.params]
        stale = [k for k in old_tags if k.startswith(TAG_STATUS_PREFIX)]

        def reopen() -> None:
            for key in stale:
                with contextlib.suppress(MlflowException):  # already gone (a racing attach)
                    self.client.delete_tag(run_id, key)
            self.client.log_batch(run_id, params=missing, tags=[RunTag(k, v) for k, v in run_tags.items()],
                                  synchronous=True)
            self.client.update_run(run_id, status="RUNNING")

        self._retry(reopen, f"reopening the run of trial {self.trial_id}")
        return run_id

    # -- metrics -----------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Metric points buffered, not yet accepted by the server."""
        return len(self._buffer)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer one evaluation's metrics at ``step``; send when ``flush_every``/``flush_interval_s`` is due.

        A key's point at or below the last step already logged for that key is dropped (see the
        module docstring: resumed trials). Never raises for an unreachable server.
        """
        step = int(step)
        timestamp = int(time.time() * 1000)
        values = {str(key): _as_float(key, value) for key, value in metrics.items()}  # all or nothing
        with self._lock:
            if self._closed:
                raise TrackingError(f"trial {self.trial_id}: log_metrics after close")
            for key, value in values.items():
                last = self._last_step.get(key)
                if last is not None and step <= last:
                    self.skipped += 1
                    continue
                self._buffer.append(Metric(key, value, timestamp, step))
                self._last_step[key] = step
            self._evals_since_flush += 1
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if self._evals_since_flush >= self.flush_every or due:
                self._flush_once()

    def _send_buffer(self) -> None:
        """Send the buffer in chunks of at most 1,000 points; a chunk leaves the buffer once accepted,
        so a retry resends only what the server has not taken. A chunk the server refuses on its
        merits is dropped with a warning (retrying it would block every later point)."""
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            try:
                with _fail_fast(self.uri, self.request_timeout_s):
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as err:
                if not _is_permanent(err):
                    raise
                log.warning("MLflow at %s refused %d metric points of trial %s (run %s), dropped: %s",
                            self.uri, len(chunk), self.trial_id, self.run_id, _one_line(err))
                self.refused += len(chunk)
            del self._buffer[: len(chunk)]

    def _flush_once(self) -> bool:
        """One attempt, unless backing off after a failure; True when the buffer is empty."""
        self._evals_since_flush = 0
        self._last_flush = time.monotonic()
        if not self._buffer:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._send_buffer()
        except Exception as err:
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(2 * self._delay, self.max_backoff_s)
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow at %s unreachable (%s); trial %s keeps %d metric points buffered and retries",
                            self.uri, _one_line(err), self.trial_id, len(self._buffer))
            return False
        if self._outage_since is not None:
            log.warning("MLflow at %s reachable again after %.0f s; trial %s sent its buffered metrics",
                        self.uri, time.monotonic() - self._outage_since, self.trial_id)
        self._outage_since = None
        self._delay = 0.5
        self._retry_at = 0.0
        return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send everything buffered, retrying with backoff for up to ``timeout_s`` (default
        ``retry_timeout_s``). True when all was sent; False (with a warning) when points remain
        or the server refused some."""
        timeout_s = self.retry_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._lock:
            refused = self.refused
            self._retry_at = 0.0  # an explicit flush tries now
            while not self._flush_once():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("MLflow at %s: trial %s could not send %d metric points in %.0f s; they stay "
                                "buffered", self.uri, self.trial_id, len(self._buffer), timeout_s)
                    return False
                time.sleep(max(0.0, min(self._retry_at - time.monotonic(), remaining)))
            return self.refused == refused

    # -- end ---------------------------------------------------------------------------------------------

    def set_status(self, status: str, **details: Any) -> bool:
        """Record how the trial ended and end its run: tags ``mannstudy.status`` and
        ``mannstudy.status_<detail>`` (``step``, ``message``, ...), MLflow status per
        ``STATUS_TO_RUN_STATUS``. Flushes the metrics first. Returns False (with a warning) when
        the server stayed unreachable for ``retry_timeout_s``; never raises for that, so a finished
        trial is not turned into an error by its bookkeeping."""
        if status not in STATUS_TO_RUN_STATUS:
            raise ValueError(f"status: expected one of {', '.join(STATUS_TO_RUN_STATUS)}, got {status!r}")
        with self._lock:
            sent = self.flush()
            tags = _status_tags(status, details)

            def record() -> None:
                self.client.log_batch(self.run_id, tags=tags, synchronous=True)
                self.client.set_terminated(self.run_id, status=STATUS_TO_RUN_STATUS[status])

            try:
                self._retry(record, f"recording status {status!r} of trial {self.trial_id}")
            except TrackingError as err:
                log.warning("%s; the run stays RUNNING in MLflow", err)
                return False
            self.status = status
            return sent

    def stop_decision(self) -> str | None:
        """Why the search stopped this trial: ``TAG_STOP`` on its run (``scheduler``) or on the study run
        (``time_budget``); None when neither holds it (Tune stopped the trial because the sweep is ending for
        another reason, such as an error in the driver)."""
        for run_id in (self.run_id, self.parent_run_id):
            run = self._retry(lambda run_id=run_id: self.client.get_run(run_id), f"reading run {run_id}")
            if TAG_STOP in run.data.tags:
                return run.data.tags[TAG_STOP]
        return None

    def close(self) -> bool:
        """Final flush; points still unsent after ``retry_timeout_s`` are given up with a warning.
        Does not end the run: ``set_status`` does (an unclosed run may be resumed by a retry)."""
        with self._lock:
            if self._closed:
                return True
            sent = self.flush()
            if not sent:
                steps = [m.step for m in self._buffer]
                log.warning("MLflow at %s: giving up on %d metric points of trial %s (run %s, steps %d..%d)",
                            self.uri, len(self._buffer), self.trial_id, self.run_id, min(steps), max(steps))
                self._buffer.clear()
            self._closed = True
            return sent

    def __enter__(self) -> TrialTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.status is None and isinstance(exc, Exception):
            self.set_status("failed", message=_one_line(f"{exc_type.__name__}: {exc}", 2000))
        self.close()


def record_stop(uri: str, run_id: str, reason: str, timeout_s: float = 60.0) -> None:
    """Tag ``run_id`` with the search's decision to stop (``TAG_STOP``: ``scheduler`` on a trial run,
    ``time_budget`` on the study run). The driver writes it before Tune stops the trials, so each stopped
    trial can tell a stop that ends it from a sweep being torn down (:meth:`TrialTracker.stop_decision`)."""
    client = _client(uri)
    _retry(lambda: client.set_tag(run_id, TAG_STOP, reason, synchronous=True), uri,
           f"recording the {reason} stop on run {run_id}", timeout_s)


def status_note(status: str, details: Mapping[str, Any]) -> str:
    """How a trial ended in words, for its run's description (the runs table's Description column):
    ``stopped early at step 600 (ASHA)``, ``diverged at step 2: loss is inf``."""
    step = details.get("step")
    at = f" at step {step}" if step is not None else ""
    message = _one_line(details["message"], 200) if details.get("message") else ""
    if status == "completed":
        return f"completed{at} (full budget)"
    if status == "stopped_early":
        by = {"scheduler": "ASHA", "time_budget": "the time budget"}.get(details.get("by"), "ASHA or the time budget")
        return f"stopped early{at} ({by})"
    if message.startswith(status):  # fit's own message already says "diverged at step ..."
        return message
    return f"{status}{at}" + (f": {message}" if message else "")


def _as_float(key: Any, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {value!r}") from None


def _status_tags(status: str, details: Mapping[str, Any]) -> list[RunTag]:
    """A trial's end as tags: ``mannstudy.status``, one ``mannstudy.status_<detail>`` each, the description."""
    tags = [RunTag(TAG_STATUS, status), RunTag(TAG_NOTE, status_note(status, details))]
    return tags + [RunTag(TAG_STATUS_PREFIX + k, _cut(str(v), MAX_TAG_VAL_LENGTH)) for k, v in details.items()]


def end_trial_run(uri: str, run_id: str, status: str, details: Mapping[str, Any]) -> None:
    """Record an end for a trial run whose own process could not (see ``study.sweep.reconcile``): the tags
    :meth:`TrialTracker.set_status` writes, and the MLflow run status of ``STATUS_TO_RUN_STATUS``."""
    client = _client(uri)
    client.log_batch(run_id, tags=_status_tags(status, details), synchronous=True)
    client.set_terminated(run_id, status=STATUS_TO_RUN_STATUS[status])


# ----------------------------------------------------------------------------------------------------------
# UI


def ui_command(uri: str, port: int) -> list[str]:
    """``mlflow ui`` on loopback for a local store (run with this interpreter: the venv's mlflow). uvicorn logs
    warnings and errors only: its start-up lines and one line per request would bury the address."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--uvicorn-opts", "--log-level warning"]


def ui_log_path(uri: str, results_dir: Path | str) -> Path:
    """Where ``mannstudy ui`` writes the server's own output: beside the SQLite database, else in the results
    folder."""
    db = _sqlite_path(uri)
    return (db.parent if db is not None else Path(results_dir)) / "mlflow-ui.log"


def study_views(uri: str, timeout_s: float = 30.0) -> list[tuple[str, str, bool]]:
    """(experiment id, study name, whether the experiment holds the runs view) of every study in the store."""
    client = _client(uri)

    def read() -> list[tuple[str, str, bool]]:
        experiments = {e.experiment_id: e for e in client.search_experiments()}
        runs = client.search_runs(list(experiments), filter_string=f"tags.`{TAG_KIND}` = '{KIND_STUDY}'",
                                  max_results=1000) if experiments else []
        found = {run.info.experiment_id: run.data.tags.get(TAG_STUDY, "") for run in runs}
        return [(eid, name, TAG_VIEW in experiments[eid].tags) for eid, name in sorted(found.items(), key=_by_id)]

    return _retry(read, uri, "listing the studies", timeout_s)


def _by_id(item: tuple[str, str]) -> tuple[int, str]:
    return (int(item[0]) if item[0].isdigit() else 0, item[0])


def runs_url(base: str, experiment_id: str, has_view: bool = True) -> str:
    """The MLflow UI's runs table of an experiment, in the machine-learning view, with the study's columns."""
    view = f"&viewStateShareKey={VIEW_KEY}" if has_view else ""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{view}"


def _print_urls(base: str, uri: str, stop_hint: str = "") -> None:
    studies = study_views(uri)
    if len(studies) == 1:
        print(f"MLflow UI: {runs_url(base, studies[0][0], studies[0][2])}{stop_hint}", flush=True)
        return
    print(f"MLflow UI: {base}{stop_hint}", flush=True)
    for experiment_id, name, has_view in studies:
        print(f"  {name}: {runs_url(base, experiment_id, has_view)}", flush=True)


class _Stop(Exception):
    """SIGTERM or SIGHUP reached ``mannstudy ui``."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def _end_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """End the server's whole process group (``mlflow ui`` and the uvicorn server it starts): SIGTERM, then
    SIGKILL for whatever is left after ``timeout_s``. Returns when no process of the group remains."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def cli_ui(results_dir: Path | str, port: int = 5000, tracking_uri: str | None = None) -> int:
    """Serve the MLflow UI of a results folder in the foreground until Ctrl+C, SIGTERM or SIGHUP; return its
    exit code. Prints the runs view of each study (:func:`runs_url`); the server's own output goes to
    :func:`ui_log_path`.

    The server runs in a process group of its own, and a stop, by whichever signal, ends that whole group:
    ``mlflow ui`` starts uvicorn as a child, which would otherwise keep the port.
    For an http(s) tracking URI there is nothing to start: the server already has a UI.
    """
    uri = resolve_tracking_uri(tracking_uri, results_dir)
    if _is_http(uri):
        _print_urls(uri, uri)
        return 0
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"{db}: no MLflow database (run a study into {results_dir} first, or pass a tracking URI)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no user
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise TrackingError(f"port {port} on 127.0.0.1 is in use; pick another with --port") from None
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # lighter and faster to start
    handlers = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    process = None
    log_path = ui_log_path(uri, results_dir)
    try:
        with open(log_path, "ab") as log:  # the server's banner and warnings: the terminal shows the address only
            process = subprocess.Popen(ui_command(uri, port), env=env, start_new_session=True,
                                       stdout=log, stderr=subprocess.STDOUT)
        _print_urls(f"http://127.0.0.1:{port}", uri, "  (Ctrl+C to stop)")
        code = process.wait()
        print(f"mlflow ui exited with code {code}; its output is in {log_path}", file=sys.stderr, flush=True)
        return code
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        handlers.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
        for sig in handlers:  # a second Ctrl+C or SIGTERM does not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if process is not None and _group_alive(process.pid):
            _end_group(process)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
