"""study.tracking against a real ``mlflow server`` on loopback and real SQLite databases (no mocks).

The one wrapper in here is a spy on ``TrialTracker.client.log_batch`` that counts requests and
passes every call through to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from mlflow_server import MlflowServer, free_port

from study.record import (
    EXPERIMENT_KIND,
    KIND_TRIAL,
    SPEC_FILE,
    STATUS_TO_RUN_STATUS,
    SUMMARY_PREFIX,
    TAG_ATTEMPTS,
    TAG_EXPERIMENT_KIND,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_MODEL,
    TAG_NODE,
    TAG_NODE_IP,
    TAG_NOTE,
    TAG_PARENT,
    TAG_SEED,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL_ID,
    TAG_VERSION_PREFIX,
    TAG_VIEW,
    VIEW_KEY,
)
from study.tracking import (
    TrackingError,
    TrialTracker,
    check_reachable,
    cli_ui,
    end_trial_run,
    find_experiment,
    find_study_run,
    find_trial_runs,
    last_logged_step,
    log_study_artifacts,
    log_study_summary,
    metric_histories,
    prepare_experiment,
    read_artifact_text,
    resolve_tracking_uri,
    runs_of_kind,
    runs_url,
    start_study_run,
    trial_run_name,
    trial_runs,
    ui_command,
)

REPO = Path(__file__).resolve().parent.parent
SPEC = {
    "name": "demo",
    "model": "ntm",
    "task": {"name": "copy", "max_length": 5},
    "fixed": {"lr": 1e-3, "model.memory_size": 64},
    "seeds": [0, 1, 2],
    "notes": "x" * 7000,  # over MLflow's 6,000-character param limit
}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """One MLflow database created as a sweep's driver creates it. Tests that need a fresh database
    start from a copy: creating one runs MLflow's schema migrations (seconds on a busy 2-core machine)."""
    results = tmp_path_factory.mktemp("template")
    prepare_experiment(resolve_tracking_uri(None, results), "template")
    return results / "mlflow.db"


def _fresh_db(template_db: Path, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(template_db, results_dir / "mlflow.db"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, template_db):
    workdir = tmp_path_factory.mktemp("mlflow_server")
    with MlflowServer(workdir, backend_uri=f"sqlite:///{_fresh_db(template_db, workdir)}") as srv:
        yield srv


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory, template_db):
    return resolve_tracking_uri(None, _fresh_db(template_db, tmp_path_factory.mktemp("results")).parent)


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("name: demo\nmodel: ntm\ntask: {name: copy, max_length: 5}\n")
    return path


def _study(uri, name, study_file):
    experiment_id = prepare_experiment(uri, name)
    return experiment_id, start_study_run(uri, experiment_id, name, SPEC, study_file)


def _children(uri, experiment_id, parent_run_id, trial_id=None):
    query = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    if trial_id:
        query += f" AND tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
    return mlflow.MlflowClient(uri).search_runs([experiment_id], filter_string=query)


def _history(uri, run_id, key):
    """(step, value) points of a metric, in step order."""
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def _spy_log_batch(tracker):
    """Count log_batch requests (metrics per request) and pass each through to MLflow."""
    sizes = []
    original = tracker.client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), synchronous=None):
        sizes.append(len(metrics))
        return original(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    tracker.client.log_batch = spy
    return sizes


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "results") == f"sqlite:///{tmp_path.resolve()}/results/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel/m.db", "results") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", "results") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("other/m.db", "results") == f"sqlite:///{tmp_path.resolve()}/other/m.db"
    assert resolve_tracking_uri("http://head:5000/", "results") == "http://head:5000"
    assert resolve_tracking_uri("postgresql://u@db/mlflow", "results") == "postgresql://u@db/mlflow"
    for bad in ("./mlruns", "file:///tmp/mlruns", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(TrackingError) as info:
            resolve_tracking_uri(bad, "results")
        assert bad in str(info.value) and "\n" not in str(info.value)


def test_study_run_with_nested_trial_runs_on_a_server(server, study_file):
    uri = server.url
    experiment_id, parent = _study(uri, "nested", study_file)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent)
    assert run.data.tags[TAG_KIND] == "study" and run.data.tags[TAG_STUDY] == "nested"
    params = run.data.params
    assert params["model"] == "ntm" and params["task.max_length"] == "5" and params["fixed.model.memory_size"] == "64"
    assert params["seeds"] == "[0, 1, 2]"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")
    assert run.data.tags[TAG_VERSION_PREFIX + "mlflow"] == mlflow.__version__
    assert {TAG_VERSION_PREFIX + p for p in ("torch", "ray", "optuna", "mannstudy")} <= set(run.data.tags)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags[TAG_GIT_COMMIT] == head.stdout.strip()
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert artifacts == {"demo.yaml", "spec.json"}
    downloaded = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="demo.yaml", tracking_uri=uri,
                                                     dst_path=str(study_file.parent / "dl"))
    assert Path(downloaded).read_text() == study_file.read_text()

    for i, trial_id in enumerate(["nested_00000", "nested_00001"]):
        with TrialTracker(uri, experiment_id, parent, trial_id, params={"seed": i, "model": "ntm", "lr": 0.01},
                          tags={"ray.trial_name": f"train_{trial_id}"}, flush_every=2) as tracker:
            for step in range(0, 500, 100):
                tracker.log_metrics({"error": 1.0 / (step + 1), "cost_bits": float("nan")}, step)
            tracker.set_status("completed", step=400)
    children = _children(uri, experiment_id, parent)
    assert sorted(r.data.tags[TAG_TRIAL_ID] for r in children) == ["nested_00000", "nested_00001"]
    for child in children:
        tags = child.data.tags
        assert tags[TAG_KIND] == "trial" and tags[TAG_MODEL] == "ntm" and tags[TAG_SEED] in ("0", "1")
        assert tags[TAG_STUDY] == "nested" and tags[TAG_STATUS] == "completed"
        assert tags[TAG_NODE] and tags[TAG_NODE_IP] and tags["ray.trial_name"].startswith("train_nested_")
        assert child.data.params["lr"] == "0.01" and child.info.status == "FINISHED"
        assert [s for s, _ in _history(uri, child.info.run_id, "error")] == [0, 100, 200, 300, 400]
        assert all(v != v for _, v in _history(uri, child.info.run_id, "cost_bits"))  # NaN kept as NaN

    # a resumed sweep reuses its parent run
    assert find_study_run(uri, experiment_id, "nested") == parent
    assert start_study_run(uri, experiment_id, "nested", SPEC, study_file) == parent
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'study'")
    assert [r.info.run_id for r in parents] == [parent]
    assert find_study_run(uri, experiment_id, "other") is None


def test_retried_trial_gets_its_run_back_with_one_point_per_step(server, study_file):
    uri = server.url
    experiment_id, parent = _study(uri, "retry", study_file)
    first = TrialTracker(uri, experiment_id, parent, "retry_00003", params={"seed": 1}, flush_every=1)
    assert not first.attached
    for step in range(6):
        first.log_metrics({"error": 1.0 - 0.1 * step, "train_loss": 2.0 - 0.1 * step}, step)
    first.set_status("failed", step=5, message="node lost")

    # the retry resumes from a checkpoint at step 2, so it re-logs steps 3..5 before going further
    second = TrialTracker(uri, experiment_id, parent, "retry_00003", params={"seed": 1, "extra": 1}, flush_every=3)
    assert second.attached and second.run_id == first.run_id
    run = mlflow.MlflowClient(uri).get_run(second.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[TAG_STATUS] == "running"
    assert "mannstudy.status_message" not in run.data.tags and run.data.tags[TAG_ATTEMPTS] == "2"
    assert run.data.params["extra"] == "1"
    for step in range(3, 10):
        second.log_metrics({"error": 0.5 - 0.01 * step, "train_loss": 1.0 - 0.01 * step}, step)
    assert second.skipped == 6  # steps 3, 4, 5 of two keys
    second.set_status("completed", step=9)
    second.close()

    (child,) = _children(uri, experiment_id, parent, "retry_00003")
    for key in ("error", "train_loss"):
        assert [s for s, _ in _history(uri, child.info.run_id, key)] == list(range(10))
    assert dict(_history(uri, child.info.run_id, "error"))[4] == pytest.approx(0.6)  # the first point wins
    assert last_logged_step(uri, child.info.run_id) == 9
    assert child.info.status == "FINISHED" and child.data.tags[TAG_STATUS] == "completed"


def test_metrics_are_sent_in_batches(server, study_file):
    uri = server.url
    experiment_id, parent = _study(uri, "batching", study_file)
    tracker = TrialTracker(uri, experiment_id, parent, "batch_0", flush_every=10, flush_interval_s=3600)
    sizes = _spy_log_batch(tracker)
    keys = [f"gen{s}x_m{j}" for s in (1, 2) for j in range(10)]
    for step in range(50):
        tracker.log_metrics({k: step + j for j, k in enumerate(keys)}, step)
    assert sizes == [200] * 5  # 1,000 points in 5 requests
    wide = {f"k{j}": float(j) for j in range(2500)}
    tracker.log_metrics(wide, 50)
    assert tracker.flush()
    assert sizes[5:] == [1000, 1000, 500]  # MLflow's limit per log_batch
    tracker.close()
    assert len(sizes) == 8
    for key in (keys[0], keys[-1]):
        assert [s for s, _ in _history(uri, tracker.run_id, key)] == list(range(50))
    assert len(mlflow.MlflowClient(uri).get_run(tracker.run_id).data.metrics) == 20 + 2500

    # the time trigger: with flush_interval_s=0 every evaluation is sent at once
    timely = TrialTracker(uri, experiment_id, parent, "batch_1", flush_every=10**6, flush_interval_s=0.0)
    sizes = _spy_log_batch(timely)
    for step in range(3):
        timely.log_metrics({"error": 0.5}, step)
    assert sizes == [1, 1, 1]
    timely.close()


@pytest.mark.slow
def test_server_restart_mid_run_loses_no_point(server, study_file, caplog):
    srv = server  # restarted on the same port and database; running again when the test ends
    try:
        uri = srv.url
        experiment_id, parent = _study(uri, "restart", study_file)
        tracker = TrialTracker(uri, experiment_id, parent, "restart_0", flush_every=1, retry_timeout_s=60,
                               max_backoff_s=1.0)
        for step in range(5):
            tracker.log_metrics({"error": 1.0 / (step + 1), "step": step}, step)
        assert tracker.pending == 0

        srv.stop()
        with caplog.at_level(logging.WARNING, logger="study.tracking"):
            for step in range(5, 10):
                tracker.log_metrics({"error": 1.0 / (step + 1), "step": step}, step)  # must not raise
        assert tracker.pending == 10
        assert any("unreachable" in r.getMessage() and uri in r.getMessage() for r in caplog.records)

        srv.start()  # same port, same database
        assert tracker.set_status("completed", step=9)
        assert tracker.close() and tracker.pending == 0
        for key in ("error", "step"):
            assert [s for s, _ in _history(uri, tracker.run_id, key)] == list(range(10))
        assert mlflow.MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        if srv.process is None:
            srv.start()


def test_unreachable_server_is_one_line_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as info:
        check_reachable(uri, timeout_s=2)
    assert uri in str(info.value) and "unreachable" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TrackingError) as info:
        TrialTracker(uri, "1", "0" * 32, "t_0", retry_timeout_s=0.5)
    assert uri in str(info.value) and "\n" not in str(info.value)


NOTES = {"completed": "completed at step 7 (full budget)",
         "stopped_early": "stopped early at step 7 (ASHA or the time budget)",
         "diverged": "diverged at 7",  # a message that starts with the status is the note itself
         "failed": "failed at 7"}


def test_statuses_map_to_tags_and_run_statuses(sqlite_uri, study_file):
    experiment_id, parent = _study(sqlite_uri, "statuses", study_file)
    client = mlflow.MlflowClient(sqlite_uri)
    for status, run_status in STATUS_TO_RUN_STATUS.items():
        tracker = TrialTracker(sqlite_uri, experiment_id, parent, f"st_{status}")
        tracker.log_metrics({"error": 0.5}, 0)
        with pytest.raises(TypeError, match="'level'"):
            tracker.log_metrics({"error": 0.1, "level": "hard"}, 1)  # nothing of a bad evaluation is kept
        assert tracker.pending == 1
        assert tracker.set_status(status, step=7, message=f"{status} at 7")
        tracker.close()
        run = client.get_run(tracker.run_id)
        assert run.info.status == run_status and run.data.tags[TAG_STATUS] == status
        assert run.data.tags["mannstudy.status_step"] == "7"
        assert run.data.tags["mannstudy.status_message"] == f"{status} at 7"
        assert run.data.tags[TAG_NOTE] == NOTES[status]  # the runs table's Description column
        assert run.data.metrics["error"] == 0.5
    # a scheduler's stop is no failure: the UI draws KILLED as a red cross, like a crash
    assert STATUS_TO_RUN_STATUS == {"completed": "FINISHED", "stopped_early": "FINISHED", "diverged": "FAILED",
                                    "failed": "FAILED"}
    with pytest.raises(ValueError):
        tracker.set_status("paused")

    with pytest.raises(RuntimeError), TrialTracker(sqlite_uri, experiment_id, parent, "st_raises") as tracker:
        tracker.log_metrics({"error": 0.5}, 0)
        raise RuntimeError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["mannstudy.status_message"] == "RuntimeError: boom"
    assert run.data.tags[TAG_NOTE] == "failed: RuntimeError: boom"
    assert run.data.metrics["error"] == 0.5


def test_the_record_is_read_back_and_a_lost_trial_ended_as_its_tracker_would(sqlite_uri, study_file):
    """The reading functions the sweep's reconcile, the replication and the analysis use, on one small study."""
    experiment_id, parent = _study(sqlite_uri, "reading", study_file)
    ended = TrialTracker(sqlite_uri, experiment_id, parent, "read_0")
    ended.log_metrics({"error": 0.5}, 0)
    ended.set_status("stopped_early", step=3)
    ended.close()
    lost = TrialTracker(sqlite_uri, experiment_id, parent, "read_1")  # its process died: the run stays RUNNING
    lost.log_metrics({"error": 0.25}, 0)
    lost.log_metrics({"error": 0.125}, 3)
    lost.close()
    end_trial_run(sqlite_uri, lost.run_id, "stopped_early", {"step": 3})
    runs = {r.info.run_id: r for r in trial_runs(sqlite_uri, experiment_id, parent)}
    assert set(runs) == {ended.run_id, lost.run_id}
    assert runs[lost.run_id].info.status == runs[ended.run_id].info.status == "FINISHED"
    status_tags = [{k: v for k, v in r.data.tags.items() if k.startswith("mannstudy.status") or k == TAG_NOTE}
                   for r in runs.values()]
    assert status_tags[0] == status_tags[1]
    assert [r.info.run_id for r in find_trial_runs(sqlite_uri, experiment_id, parent, "read_1")] == [lost.run_id]
    assert find_experiment(sqlite_uri, "reading") == experiment_id and find_experiment(sqlite_uri, "none") is None
    assert [r.info.run_id for r in runs_of_kind(sqlite_uri, experiment_id, KIND_TRIAL)] == [ended.run_id, lost.run_id]
    assert json.loads(read_artifact_text(sqlite_uri, parent, SPEC_FILE))["name"] == "demo"
    for method in ("auto", "per_run"):
        rows = metric_histories(sqlite_uri, [ended.run_id, lost.run_id], ["error"], method)
        assert sorted((run_id == lost.run_id, step, value) for run_id, _, step, value, _ in rows) == [
            (False, 0, 0.5), (True, 0, 0.25), (True, 3, 0.125)]


def test_refused_points_are_reported_not_retried_forever(sqlite_uri, study_file, caplog):
    experiment_id, parent = _study(sqlite_uri, "refused", study_file)
    tracker = TrialTracker(sqlite_uri, experiment_id, parent, "gone_0", flush_every=100, retry_timeout_s=30)
    mlflow.MlflowClient(sqlite_uri).delete_run(tracker.run_id)  # the server now refuses this run's metrics
    tracker.log_metrics({"error": 0.5}, 0)
    with caplog.at_level(logging.WARNING, logger="study.tracking"):
        assert not tracker.flush()
    assert tracker.pending == 0 and tracker.refused == 1
    assert any("refused 1 metric points" in r.getMessage() for r in caplog.records)


def test_study_artifacts_and_last_logged_step(sqlite_uri, study_file, tmp_path):
    experiment_id, parent = _study(sqlite_uri, "artifacts", study_file)
    report = tmp_path / "report"
    (report / "plots").mkdir(parents=True)
    (report / "index.html").write_text("<html></html>")
    (report / "plots" / "a.png").write_bytes(b"png")
    log_study_artifacts(sqlite_uri, parent, [report, study_file], artifact_path="report")
    client = mlflow.MlflowClient(sqlite_uri)
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/report", "report/demo.yaml"}
    assert {a.path for a in client.list_artifacts(parent, "report/report/plots")} == {"report/report/plots/a.png"}
    with pytest.raises(TrackingError) as info:
        log_study_artifacts(sqlite_uri, parent, [tmp_path / "missing.html"])
    assert "missing.html" in str(info.value)
    assert last_logged_step(sqlite_uri, parent) is None
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location == (Path(sqlite_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()


@pytest.mark.slow
def test_local_sqlite_default_works_from_a_trial_process_in_another_cwd(tmp_path, study_file, monkeypatch,
                                                                       template_db):
    monkeypatch.chdir(tmp_path)
    _fresh_db(template_db, tmp_path / "results")
    uri = resolve_tracking_uri(None, "results")
    experiment_id, parent = _study(uri, "local", study_file)
    elsewhere = tmp_path / "trial_cwd"
    elsewhere.mkdir()
    script = textwrap.dedent("""
        import sys
        from study.tracking import TrialTracker
        uri, experiment_id, parent = sys.argv[1:4]
        with TrialTracker(uri, experiment_id, parent, "local_0", params={"seed": 3}, flush_every=2) as tracker:
            for step in range(4):
                tracker.log_metrics({"error": 1.0 / (step + 1)}, step)
            tracker.set_status("completed", step=3)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, uri, experiment_id, parent], cwd=elsewhere, env=env, check=True,
                   timeout=120)
    (child,) = _children(uri, experiment_id, parent, "local_0")
    assert [s for s, _ in _history(uri, child.info.run_id, "error")] == [0, 1, 2, 3]
    assert child.info.status == "FINISHED" and child.data.tags[TAG_SEED] == "3"
    assert list(elsewhere.iterdir()) == []  # no stray database or mlruns in the trial's cwd
    assert (tmp_path / "results" / "mlflow.db").is_file()
    assert list((tmp_path / "results" / "artifacts").rglob("demo.yaml"))


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # a zombie holds no port
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    """Nothing listens on the port and a new server can bind it (as uvicorn does, with SO_REUSEADDR: the
    closed connections' TIME_WAIT do not count)."""
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT to the group (Ctrl+C)", "SIGTERM to mannstudy ui alone"])
def test_cli_ui_serves_the_runs_view_and_stops_its_whole_server(tmp_path, study_file, template_db, stop,
                                                                 sigint_reaches_children):
    with pytest.raises(TrackingError) as info:
        cli_ui(tmp_path / "empty", port=free_port())
    assert "no MLflow database" in str(info.value) and "\n" not in str(info.value)

    _fresh_db(template_db, tmp_path / "results")
    uri = resolve_tracking_uri(None, tmp_path / "results")
    experiment_id, _ = _study(uri, "ui", study_file)
    port = free_port()
    assert ui_command(uri, port)[2:] == ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                         "--port", str(port), "--workers", "1", "--uvicorn-opts",
                                         "--log-level warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ui = subprocess.Popen([sys.executable, "-m", "study.cli", "ui", str(tmp_path / "results"), "--port", str(port)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    server = set()
    try:
        # the one study's runs, in the machine-learning view, with the study's columns
        assert ui.stdout.readline().strip() == f"MLflow UI: {runs_url(f'http://127.0.0.1:{port}', experiment_id)}" \
                                              "  (Ctrl+C to stop)"
        probe = MlflowServer(tmp_path / "probe", port=port)  # only for its health check
        deadline = time.monotonic() + 180  # a loaded machine takes a minute or more to start the server
        while not probe.healthy() and time.monotonic() < deadline and ui.poll() is None:
            time.sleep(0.2)
        assert probe.healthy(), "mlflow ui did not come up"
        experiment = mlflow.MlflowClient(probe.url).get_experiment_by_name("ui")
        assert VIEW_KEY and TAG_VIEW in experiment.tags  # what the URL's viewStateShareKey names
        server = _descendants(ui.pid)
        assert server, "mlflow ui runs as a child of mannstudy ui"
        if stop.startswith("SIGINT"):
            os.killpg(ui.pid, signal.SIGINT)  # what Ctrl+C in a terminal does
        else:
            os.kill(ui.pid, signal.SIGTERM)  # a service manager, or kill PID
        assert ui.wait(timeout=90) == 0  # the group gets SIGTERM, then SIGKILL after 15 s: ample under load
        assert not [pid for pid in server if _alive(pid)], "a server process outlived mannstudy ui"
        assert _port_free(port)
        # the terminal holds the address and nothing else; the server's banner went to its log
        assert ui.stdout.read() == "" and ui.stderr.read() == ""
        assert "Security middleware" in (tmp_path / "results" / "mlflow-ui.log").read_text()
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        for pid in server:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_trial_run_names_say_model_searched_values_and_seed(sqlite_uri, study_file):
    assert trial_run_name({"model": "ntm", "lr": 0.0031623, "seed": 1}) == "ntm lr=3.2e-3 seed=1"
    assert trial_run_name({"model": "dnc", "lr": 0.01, "model.read_heads": 2, "seed": 0}) == \
        "dnc lr=0.01 read_heads=2 seed=0"
    assert trial_run_name({"lr": 3e-5, "model.memory_size": 64, "task.curriculum": True}) == \
        "lr=3e-5 memory_size=64 curriculum=True"
    assert trial_run_name({"model": "lstm", "lr": 0.25, "clip_value": 12345.0, "seed": 2}) == \
        "lstm lr=0.25 clip_value=1.2e4 seed=2"
    experiment_id, parent = _study(sqlite_uri, "names", study_file)
    tracker = TrialTracker(sqlite_uri, experiment_id, parent, "nm_0", run_name="ntm lr=3.2e-3 seed=1")
    unnamed = TrialTracker(sqlite_uri, experiment_id, parent, "nm_1")
    client = mlflow.MlflowClient(sqlite_uri)
    assert client.get_run(tracker.run_id).info.run_name == "ntm lr=3.2e-3 seed=1"
    assert client.get_run(unnamed.run_id).info.run_name == "nm_1"
    again = TrialTracker(sqlite_uri, experiment_id, parent, "nm_0", run_name="other")  # a retry keeps its run
    assert again.run_id == tracker.run_id and client.get_run(again.run_id).info.run_name == "ntm lr=3.2e-3 seed=1"


def test_study_run_carries_description_summary_and_the_runs_view(sqlite_uri, study_file):
    spec = {**SPEC, "description": "NTM vs DNC on copy", "models": ["ntm", "dnc"],
            "objective": {"metric": "error", "mode": "min"},
            "search": {"lr": {"low": 1e-3, "high": 1e-2}, "model.read_heads": {"choices": [1, 2]}}}
    experiment_id = prepare_experiment(sqlite_uri, "summary")
    parent = start_study_run(sqlite_uri, experiment_id, "summary", spec, study_file)
    client = mlflow.MlflowClient(sqlite_uri)
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    view = json.loads(experiment.tags[TAG_VIEW])
    assert view["selectedColumns"] == ["attributes.`Description`", "metrics.`error`", "metrics.`study.best_error`",
                                       "params.`model`", "params.`lr`", "params.`model.read_heads`", "params.`seed`",
                                       "tags.`mannstudy.status`"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`error`", True)
    assert view["columnOrder"] == list(view["columnWidths"]) == ["attributes.`Run Name`", "attributes.`Description`"]
    assert client.get_run(parent).data.tags[TAG_NOTE] == "NTM vs DNC on copy"

    log_study_summary(sqlite_uri, parent, {"completed": 3, "stopped_early": 4, "diverged": 1}, 12.5, "error", 0.25)
    run = client.get_run(parent)
    assert {k: v for k, v in run.data.metrics.items() if k.startswith(SUMMARY_PREFIX)} == {
        "study.trials_completed": 3, "study.trials_stopped_early": 4, "study.trials_diverged": 1, "study.trials": 8,
        "study.wall_time_s": 12.5, "study.best_error": 0.25}
    assert run.data.tags[TAG_NOTE] == ("8 trials (3 completed, 1 diverged, 4 stopped_early); best error 0.25; "
                                       "12 s of wall time\n\nNTM vs DNC on copy")
    # a resumed study: the run and its summary stay; the next summary counts both sessions' wall time
    assert start_study_run(sqlite_uri, experiment_id, "summary", spec, study_file) == parent
    assert client.get_run(parent).data.metrics["study.trials"] == 8
    assert client.get_run(parent).data.tags[TAG_NOTE].startswith("8 trials")
    log_study_summary(sqlite_uri, parent, {"completed": 9}, 7.5, "error", float("nan"))
    run = client.get_run(parent)
    assert run.data.metrics["study.wall_time_s"] == 20.0 and run.data.metrics["study.trials"] == 9
    assert run.data.metrics["study.best_error"] == 0.25  # no new best: the last one stays
    assert run.data.tags[TAG_NOTE] == "9 trials (9 completed); 20 s of wall time\n\nNTM vs DNC on copy"

    assert runs_url("http://127.0.0.1:5000", experiment_id) == \
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning" \
        f"&viewStateShareKey={VIEW_KEY}"
    assert runs_url("http://h:1/", "7", has_view=False) == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"


def test_mlflow_keeps_each_distinct_point_at_a_step(sqlite_uri):
    """Why TrialTracker dedupes per (key, step): MLflow only merges identical points."""
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(sqlite_uri)
    run_id = client.create_run(prepare_experiment(sqlite_uri, "mlflow_points")).info.run_id
    client.log_batch(run_id, metrics=[Metric("error", 1.0, 1000, 5)])
    client.log_batch(run_id, metrics=[Metric("error", 1.0, 1000, 5)])  # a resent request: merged
    assert _history(sqlite_uri, run_id, "error") == [(5, 1.0)]
    client.log_batch(run_id, metrics=[Metric("error", 2.0, 2000, 5)])  # a resumed trial re-logging step 5: kept
    assert _history(sqlite_uri, run_id, "error") == [(5, 1.0), (5, 2.0)]
