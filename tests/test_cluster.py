"""The cluster path on one machine: a sweep whose Optuna study and MLflow backend store live in a real
PostgreSQL server, with a password that must not appear anywhere the sweep logs, prints or writes.

The server (tests/postgres_server.py) is a new PostgreSQL cluster with password authentication on
127.0.0.1. The MLflow server reads its password from a libpq password file (``PGPASSFILE``), as
cluster.yaml's head does with ``~/.pgpass``, so its command line names only the user; the study's
``storage`` carries the password in the URL, the case that redaction must cover.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer
from postgres_server import PostgresServer, unavailable_reason

from study.redact import redact, redact_values

REPO = Path(__file__).resolve().parent.parent
SECRET = "Pw4Cluster-Tests-x9"  # the database password the record must never hold


# ------------------------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize("text, expected", [
    ("postgresql://mannstudy:s3cret@db:5432/optuna", "postgresql://mannstudy:***@db:5432/optuna"),
    ("postgresql+psycopg2://u:p%40ss@10.0.0.1/optuna?sslmode=require",
     "postgresql+psycopg2://u:***@10.0.0.1/optuna?sslmode=require"),
    ("storage postgresql://u:p@h/db and http://x:y@host:5000 too", "storage postgresql://u:***@h/db and "
                                                                   "http://x:***@host:5000 too"),
    ("postgresql://h/db?user=u&password=s3cret&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("host=db user=u password=s3cret dbname=optuna", "host=db user=u password=*** dbname=optuna"),
    ("postgresql://a:a@h/db", "postgresql://a:***@h/db"),
])
def test_redact_masks_the_password_and_keeps_the_rest(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "postgresql://mannstudy@localhost:5432/optuna",  # a password file supplies it: nothing to hide
    "http://10.0.0.1:5000", "sqlite:////tmp/x/optuna.db", "s3://bucket/results", "user@example.org",
    "https://host:5000/path@v2",
    "postgresql://u:${DB_PASSWORD}@h/db",  # a study file's reference names the variable, not its value
])
def test_redact_leaves_urls_without_a_password_alone(text):
    assert redact(text) == text


def test_redact_values_walks_nested_specs():
    spec = {"storage": "postgresql://u:pw@h/db", "budget": {"num_samples": 4}, "models": ["ntm"],
            "search": {"lr": {"choices": ["mysql://a:b@c/d"]}}}
    assert redact_values(spec) == {"storage": "postgresql://u:***@h/db", "budget": {"num_samples": 4},
                                   "models": ["ntm"], "search": {"lr": {"choices": ["mysql://a:***@c/d"]}}}


def test_a_refused_sweep_does_not_print_the_password(tmp_path):
    """The command's one-line errors go through the same function: an unreachable tracking server named with
    credentials in its URL."""
    from conftest import write_study

    path = write_study("fifo", tmp_path, tracking_uri=f"http://mannstudy:{SECRET}@127.0.0.1:9")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANNSTUDY_", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "study.cli", "sweep", str(path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unreachable" in proc.stderr and "mannstudy:***@127.0.0.1:9" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def postgres():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL server can start here: {reason}")
    server = PostgresServer(password=SECRET, databases=("optuna", "mlflow")).start()
    print(f"\nPostgreSQL: initdb + start + role + databases in {server.start_s:.2f} s")
    yield server
    server.stop()


def _mid_sweep(postgres) -> bool:
    """A completed trial and a running one that has reported (so has a checkpoint in the bucket), read from the
    Optuna database in PostgreSQL."""
    import psycopg

    try:
        with psycopg.connect(postgres.url("optuna"), connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
            completed = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM trials t WHERE t.state = 'RUNNING' AND EXISTS "
                        "(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)")
            return completed > 0 and cur.fetchone()[0] > 0
    except psycopg.Error:  # the tables are not there yet
        return False


def _bucket_files(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (s3://bucket/prefix), by key, read through pyarrow as Tune reads them."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(url)
    files = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                files[info.path] = f.readall()
    return files


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One local S3-protocol server for this module (each test its own bucket), its endpoint in this process's
    environment and so in every process started from here: the variables a real bucket does not need, read by
    boto3 (the MLflow server's artifacts) and pyarrow (Tune, mannstudy, the report)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra has it)")
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start(timeout_s=300)
    print(f"\nmoto S3 server answering after {server.start_s:.2f} s")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**server.env(), "MLFLOW_S3_ENDPOINT_URL": server.url}.items():
            mp.setenv(key, value)
        yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster_sweep(postgres, s3, ray_env, record, tmp_path_factory):
    """The cluster path on one machine, end to end: ``results_dir`` in a local S3 server's bucket (Tune's state,
    checkpoints, mannstudy's kept state), the MLflow server's artifacts in the same bucket, Optuna's study and
    MLflow's backend store in PostgreSQL. ``mannstudy sweep`` (its own local Ray, as on a head node) is SIGKILLed
    mid-sweep, ``mannstudy sweep --resume`` finishes the study, ``mannstudy replicate`` re-runs its best
    configuration with two fresh seeds (batched, in the same bucket), ``mannstudy report`` reads it all back
    (checkpoints included) from the bucket. Returns what they printed and left behind."""
    import boto3
    from conftest import end_ray_folder, kill_group, write_study

    from analysis.report import cli_report

    folder = tmp_path_factory.mktemp("cluster")
    pgpass = postgres.write_pgpass(folder / "pgpass")
    boto3.client("s3").create_bucket(Bucket="results")
    # The MLflow server's command line names no password: libpq reads it from the password file.
    server = MlflowServer(folder / "mlflow", backend_uri=postgres.url("mlflow", with_password=False),
                          artifacts="s3://results/mlflow-artifacts")
    with pytest.MonkeyPatch.context() as server_env:
        server_env.setenv("PGPASSFILE", str(pgpass))
        server.start(timeout_s=600)  # its first start also creates MLflow's tables in PostgreSQL
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        path = write_study("fifo", folder, name="pg", tracking_uri=server.url, storage=postgres.url("optuna"),
                           results_dir="s3://results/pg", budget={"num_samples": 3, "max_steps": 20})
        driver_env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
        sweep = [sys.executable, "-m", "study.cli", "sweep", str(path)]
        logs = [folder / "killed.log", folder / "resumed.log"]
        with open(logs[0], "wb") as out:
            driver = subprocess.Popen(sweep, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=driver_env,
                                      start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not _mid_sweep(postgres) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert driver.poll() is None, f"the driver ended before the kill:\n{logs[0].read_text()[-3000:]}"
        finally:
            kill_group(driver.pid)  # SIGKILL: nothing is flushed
            driver.wait(timeout=30)
            end_ray_folder(ray_tmp)  # Ray's processes that left the driver's group, then its folder
        killed = _bucket_files("s3://results/pg")
        ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        with open(logs[1], "wb") as out:
            resumed = subprocess.run([*sweep, "--resume"], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                                     env={**driver_env, "RAY_TMPDIR": ray_tmp}, timeout=900)
        assert resumed.returncode == 0, logs[1].read_text()[-3000:]
        end_ray_folder(ray_tmp)
        ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        logs.append(folder / "replicated.log")
        with open(logs[2], "wb") as out:
            replicated = subprocess.run(
                [sys.executable, "-m", "study.cli", "replicate", str(path), "--top", "1", "--seeds", "2"], cwd=folder,
                stdout=out, stderr=subprocess.STDOUT, env={**driver_env, "RAY_TMPDIR": ray_tmp}, timeout=900)
        assert replicated.returncode == 0, logs[2].read_text()[-3000:]
        out, err = io.StringIO(), io.StringIO()
        report_dir = folder / "report"
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli_report(str(path), out=str(report_dir)) == 0, err.getvalue()
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        printed = "".join(log.read_text(errors="replace") for log in logs) + out.getvalue() + err.getvalue()
        yield {"path": path, "printed": printed, "rec": record(path), "server": server, "cmdline": cmdline,
               "killed": killed, "bucket": _bucket_files("s3://results"), "report": report_dir, "folder": folder}
    finally:
        end_ray_folder(ray_tmp)
        server.stop()


@pytest.mark.slow
def test_a_sweep_killed_and_resumed_runs_end_to_end_on_object_storage_and_postgresql(cluster_sweep, postgres):
    import psycopg

    from study.record import KIND_REPLICATION, TAG_KIND, TAG_PARENT, TAG_REPLICATION, TAG_SEED, TAG_STATUS, TAG_TRIAL_ID
    from study.state import BEGUN, STATE_BUNDLE, TUNER_COPY

    rec = cluster_sweep["rec"]
    assert rec.spec.results_dir == "s3://results/pg" and rec.spec.storage.startswith("postgresql://")
    # killed mid-sweep: Tune's state, a checkpoint and mannstudy's kept state were in the bucket already
    killed = set(cluster_sweep["killed"])
    kept = "results/pg/ray/.mannstudy/tune/"
    assert {kept + BEGUN, kept + TUNER_COPY, kept + STATE_BUNDLE} <= killed
    assert "results/pg/ray/tune/tuner.pkl" in killed and any("/checkpoint_" in key for key in killed)
    # resumed to the end: every trial accounted for once, in PostgreSQL (Optuna) and by the MLflow server
    trials = rec.trials()
    assert all(t.state.is_finished() for t in trials)
    ran = [t for t in trials if t.user_attrs["status"] != "not_run"]  # not_run: asked by the killed driver only
    assert len(ran) == 3 and {t.user_attrs["status"] for t in ran} == {"completed"}
    children = rec.children()
    by_trial = {r.data.tags[TAG_TRIAL_ID]: r for r in children}
    assert len(by_trial) == len(children) and {t.user_attrs["tune_trial_id"] for t in ran} <= set(by_trial)
    assert all(by_trial[t.user_attrs["tune_trial_id"]].info.status == "FINISHED" for t in ran)
    assert all(r.info.status != "RUNNING" for r in children)
    (parent,) = rec.parents()
    assert parent.info.status == "FINISHED"
    # the replication: its runs under their run keys, Tune's state, the kept state and checkpoints in the bucket
    (replication,) = rec.client.search_runs([rec.experiment_id()], f"tags.`{TAG_KIND}` = '{KIND_REPLICATION}'")
    rep_id = replication.data.tags[TAG_REPLICATION]
    assert replication.info.status == "FINISHED"
    replicated = [r for r in children if r.data.tags[TAG_PARENT] == replication.info.run_id]
    assert sorted(r.data.tags[TAG_TRIAL_ID] for r in replicated) == sorted(
        f"{rep_id}.c0.s{r.data.tags[TAG_SEED]}" for r in replicated) and len(replicated) == 2
    assert {r.data.tags[TAG_STATUS] for r in replicated} == {"completed"}
    bucket = cluster_sweep["bucket"]
    kept = f"results/pg/ray/.mannstudy/{rep_id}/"
    assert {kept + BEGUN, kept + TUNER_COPY, kept + STATE_BUNDLE} <= set(bucket)
    assert f"results/pg/ray/{rep_id}/tuner.pkl" in bucket
    assert any(key.startswith(f"results/pg/ray/{rep_id}/run_point_{rep_id}.c0_x2_") and "/seed-" in key
               for key in bucket)
    # the runs really are in PostgreSQL, not in a SQLite file beside the server, nor anything on local disk
    with psycopg.connect(postgres.url("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 2 + len(children)  # the study's and the replication's parent runs
    assert not list(Path(cluster_sweep["server"].workdir).glob("*.db"))
    assert not (cluster_sweep["folder"] / "results").exists() and not (cluster_sweep["folder"] / "s3:").exists()
    # the MLflow artifacts (study file, spec, report) are in the bucket, through the server's proxy
    artifacts = [k for k in cluster_sweep["bucket"] if k.startswith("results/mlflow-artifacts/")]
    assert any(k.endswith("/spec.json") for k in artifacts) and any("/report/" in k for k in artifacts)
    # the report read the trials' checkpoints from the bucket: its generalization section was evaluated
    summary = (cluster_sweep["report"] / "summary.md").read_text()
    assert f"Replication {rep_id}: 1 configurations x 2 seeds" in summary
    generalization = summary.split("## Generalization\n")[1].split("\n## ")[0]
    assert "](figures/" in generalization and "Not evaluated" not in generalization, generalization


@pytest.mark.slow
def test_the_password_is_nowhere_in_the_record(cluster_sweep, tmp_path):
    import mlflow

    rec = cluster_sweep["rec"]
    parent, = rec.parents()
    # recorded, but masked: the record still says which database held the study
    assert parent.data.params["storage"] == postgres_url_masked(rec.spec.storage)
    texts = {"printed": cluster_sweep["printed"], "mlflow server command line": cluster_sweep["cmdline"]}
    for run in [parent, *rec.children()]:
        texts[f"params of {run.info.run_id}"] = repr(run.data.params)
        texts[f"tags of {run.info.run_id}"] = repr(run.data.tags)
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=rec.spec.tracking_uri,
                                                    dst_path=str(tmp_path / run.info.run_id))
        for file in Path(local).rglob("*"):
            if file.is_file():
                texts[f"artifact {file.relative_to(tmp_path)}"] = file.read_bytes().decode(errors="replace")
    artifacts = [k for k in texts if k.startswith("artifact")]
    assert any(k.endswith("spec.json") for k in artifacts) and any(k.endswith("pg.yaml") for k in artifacts)
    assert "***" in next(texts[k] for k in artifacts if k.endswith("pg.yaml"))  # the study file, masked
    # every object in the bucket, after the kill and at the end: Tune's pickled tuner, searcher and callback state,
    # its experiment state and trial results, mannstudy's kept copies of them; and the report's files
    objects = {**{f"(killed) {k}": v for k, v in cluster_sweep["killed"].items()}, **cluster_sweep["bucket"]}
    assert any("/searcher-state-" in k for k in objects) and any(k.endswith(".mannstudy/tune/state.pkl")
                                                                  for k in objects)
    for key, data in objects.items():
        texts[f"object {key}"] = data.decode(errors="replace")
    for file in cluster_sweep["report"].rglob("*"):
        if file.is_file():
            texts[f"report {file.name}"] = file.read_bytes().decode(errors="replace")
    leaks = [where for where, text in texts.items() if SECRET in text]
    assert not leaks, leaks


def postgres_url_masked(url: str) -> str:
    return url.replace(f":{SECRET}@", ":***@")


# ------------------------------------------------------------------------------------------------ cluster defaults


@pytest.fixture
def no_cluster_env(monkeypatch):
    from conftest import STUDY_ENV

    for key in STUDY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MANNSTUDY_ENV_FILE", "")
    return monkeypatch


def test_the_cluster_defaults_come_from_the_env_file_when_the_environment_lacks_them(no_cluster_env, tmp_path):
    """A `ray job submit` driver inherits no login shell: the head's ~/mannstudy.env gives it the same defaults."""
    from conftest import write_study

    from study.spec import cluster_env, load_spec

    env_file = tmp_path / "mannstudy.env"
    env_file.write_text("# written by cluster.yaml's head_setup_commands\n"
                        'export MLFLOW_TRACKING_URI="http://10.0.0.1:5000"\n'
                        "MANNSTUDY_STORAGE='postgresql://mannstudy@localhost:5432/optuna'\n"
                        "export MANNSTUDY_RESULTS_DIR=s3://bucket/results\n")
    data = yaml_without_locations(write_study("fifo", tmp_path))
    assert cluster_env() == {}
    no_cluster_env.setenv("MANNSTUDY_ENV_FILE", str(env_file))
    spec = load_spec(data)
    assert (spec.tracking_uri, spec.storage, spec.results_dir) == (
        "http://10.0.0.1:5000", "postgresql://mannstudy@localhost:5432/optuna", "s3://bucket/results/fifo")
    # the process's own environment wins (a KubeRay pod sets the variables on its container)
    no_cluster_env.setenv("MANNSTUDY_STORAGE", "postgresql://mannstudy@db:5432/optuna")
    assert load_spec(data).storage == "postgresql://mannstudy@db:5432/optuna"
    assert cluster_env()["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"


def yaml_without_locations(path: Path) -> Path:
    import yaml

    data = yaml.safe_load(path.read_text())
    for key in ("results_dir", "tracking_uri", "storage"):
        data.pop(key, None)
    path.write_text(yaml.safe_dump(data))
    return path


def _node(node_id: str, address: str, cpu: float, gpu: float = 0.0) -> dict:
    """One entry of ``ray.nodes()`` (the keys unshared_record reads)."""
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": True, "Resources": resources}


def test_a_multi_node_cluster_refuses_a_record_on_the_driver_machine(no_cluster_env, tmp_path, monkeypatch):
    from conftest import write_study

    from study.spec import load_spec
    from study.sweep import unshared_record

    monkeypatch.chdir(tmp_path)
    fallback = load_spec(yaml_without_locations(write_study("fifo", tmp_path / "a")))  # results/fifo, SQLite
    two_hosts = [_node("head", "10.0.0.1", 8), _node("w1", "10.0.0.2", 8)]
    cpu0_head = [_node("head", "10.0.0.1", 0)]  # cluster.yaml's head: trials only on workers yet to come
    one_box = [_node("head", "127.0.0.1", 2), _node("w1", "127.0.0.1", 2)]  # ray.cluster_utils on one machine
    problem = unshared_record(fallback, two_hosts, "head")
    assert problem and "2 machines" in problem and "tracking_uri is a SQLite file" in problem
    assert "no room for a trial" in unshared_record(fallback, cpu0_head, "head")
    assert unshared_record(fallback, one_box, "head") is None
    assert unshared_record(fallback, [_node("head", "10.0.0.1", 0, gpu=1)], "other") is None  # driver elsewhere

    # a shared tracking server but the results folder fell back to the driver's disk
    served = load_spec(yaml_without_locations(write_study("fifo", tmp_path / "b")))
    served = type(served)(**{**served.__dict__, "tracking_uri": "http://10.0.0.1:5000"})
    assert "results_dir fell back" in unshared_record(served, two_hosts, "head", cwd=tmp_path)
    # everything shared: an NFS folder named by the cluster's environment, or object storage
    shared = type(served)(**{**served.__dict__, "results_dir": "/mnt/shared/results/fifo"})
    assert unshared_record(shared, two_hosts, "head", cwd=tmp_path) is None


@pytest.mark.slow
def test_the_session_cluster_is_one_machine_and_is_not_refused(ray_cluster, study_file, tmp_path):
    import ray

    from study.spec import load_spec
    from study.sweep import unshared_record

    spec = load_spec(study_file("fifo", tmp_path))
    assert unshared_record(spec, ray.nodes(), ray.get_runtime_context().get_node_id()) is None


# ------------------------------------------------------------------------------------------------ GPU accounting


@pytest.mark.slow
def test_a_trial_without_gpus_sees_none(ray_cluster):
    """A node whose environment names a GPU (CUDA_VISIBLE_DEVICES=0, as on a GPU worker): Ray leaves the variable
    to a gpu-0 task as it is, and hide_gpus (the first thing run_trial does) empties it."""
    import ray

    from study.trainable import hide_gpus

    @ray.remote(num_cpus=1, num_gpus=0, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}})
    def visible(hide: bool) -> str | None:
        if hide:
            hide_gpus(0.0)
        import torch

        return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()

    as_ray_leaves_it, hidden = ray.get([visible.remote(False), visible.remote(True)])
    assert as_ray_leaves_it[0] == "0"
    assert hidden == ("", 0)


# ------------------------------------------------------------------------------------------------ scale-up, node setup


def test_the_autoscaler_sees_as_many_pending_trials_as_the_study_runs_at_once(no_cluster_env, tmp_path):
    from conftest import write_study

    from study.spec import load_spec
    from study.sweep import pending_trials

    spec = load_spec(write_study("fifo", tmp_path, concurrency=64))
    assert pending_trials(spec, {"CPU": 0.0}) == 64  # a head with no workers yet: all 64 are shown at once
    free = load_spec(write_study("fifo", tmp_path / "free", concurrency=None, resources={"cpu": 2, "gpu": 0.25}))
    assert pending_trials(free, {"CPU": 48.0, "GPU": 4.0}) == 16  # as many as the present resources hold
    assert pending_trials(free, {"CPU": 48.0, "GPU": 1.0}) == 4
    assert pending_trials(free, {"CPU": 0.0}) == 1


@pytest.mark.slow
def test_a_node_without_a_compiler_finishes_its_setup(tmp_path):
    """cluster.yaml's setup runs `python -m mann.native`: without a usable C++ compiler it warns and exits 0
    (the package runs the reference models), so the node still joins."""
    env = {**os.environ, "MANN_NATIVE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-g++")}
    proc = subprocess.run([sys.executable, "-m", "mann.native"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("could not be built") == 3 and "reference models" in proc.stderr


# ------------------------------------------------------------------------------------------------ object storage


def test_a_local_s3_server_serves_boto3_and_pyarrow(s3):
    """The fixture object-storage tests build on: moto's standalone S3 server on 127.0.0.1, reached by boto3
    and by pyarrow's S3 filesystem (the one Ray Tune uses for an s3:// storage path) through the standard
    endpoint variables, as a real bucket is."""
    import boto3
    import pyarrow.fs as pafs

    client = boto3.client("s3")
    client.create_bucket(Bucket="probe")
    client.put_object(Bucket="probe", Key="study/by-boto3.txt", Body=b"boto3")
    fs, path = pafs.FileSystem.from_uri("s3://probe/study")
    assert isinstance(fs, pafs.S3FileSystem) and path == "probe/study"
    with fs.open_output_stream("probe/study/by-pyarrow.txt") as out:
        out.write(b"pyarrow")
    listed = sorted(info.path for info in fs.get_file_info(pafs.FileSelector("probe/study")))
    assert listed == ["probe/study/by-boto3.txt", "probe/study/by-pyarrow.txt"]
    assert client.get_object(Bucket="probe", Key="study/by-pyarrow.txt")["Body"].read() == b"pyarrow"


def test_resume_puts_back_the_kept_state_in_a_bucket(s3):
    """study/state.py on object storage: the kept copies replace a torn tuner.pkl and experiment state in the
    bucket, and a later session's state file is set aside, as on a local folder (tests/test_sweep.py)."""
    import pickle

    import boto3

    from study import state

    boto3.client("s3").create_bucket(Bucket="kept")
    exp = "s3://kept/study/ray/tune"
    kept = state.state_dir(exp)
    assert kept == "s3://kept/study/ray/.mannstudy/tune" and not state.has_tune_state(exp)
    complete = {"experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": []}',
                "searcher-state-2026-01-01_00-00-00.pkl": pickle.dumps({"trials": 3})}
    state.write_atomically(state.join(kept, state.STATE_BUNDLE), pickle.dumps(complete))
    state.write_atomically(state.join(kept, state.TUNER_COPY), pickle.dumps({"tuner": 1}))
    state.write_atomically(state.join(exp, state.TUNER_PKL), b"")  # torn
    state.write_atomically(state.join(exp, "experiment_state-2026-01-01_00-00-00.json"), b'{"trial_da')
    state.write_atomically(state.join(exp, "experiment_state-2026-01-02_00-00-00.json"), b'{"trial_data": [')
    assert state.has_tune_state(exp)
    assert state.prepare_restore(exp, "study.yaml") is True
    client = boto3.client("s3")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="kept", Prefix="study/ray/tune/")["Contents"]
            if not o["Key"].endswith("/")}  # pyarrow's move leaves a folder marker
    assert keys == {"study/ray/tune/tuner.pkl", "study/ray/tune/experiment_state-2026-01-01_00-00-00.json",
                    "study/ray/tune/searcher-state-2026-01-01_00-00-00.pkl",
                    "study/ray/tune/experiment_state-2026-01-02_00-00-00.json.stale"}
    for name, data in complete.items():
        assert state.read_bytes(state.join(exp, name)) == data
    assert pickle.loads(state.read_bytes(state.join(exp, state.TUNER_PKL))) == {"tuner": 1}


# ---------------------------------------------------------------------------------------------- the driver as a Ray Job


def test_submit_uploads_the_study_file_alone_and_runs_the_sweep_command_in_the_cluster(tmp_path):
    from conftest import write_study

    from study.submit import job_request

    path = write_study("fifo", tmp_path / "here", name="my study")
    (tmp_path / "here" / "results").mkdir()  # whatever else the folder holds stays here
    request = job_request(path, resume=True, folder=tmp_path / "job")
    assert request.entrypoint == "mannstudy sweep 'my study.yaml' --resume"
    assert [p.name for p in request.working_dir.iterdir()] == ["my study.yaml"]
    assert (request.working_dir / "my study.yaml").read_bytes() == path.read_bytes()
    assert job_request(path, resume=False, folder=tmp_path / "job2").entrypoint == "mannstudy sweep 'my study.yaml'"


def test_submit_to_an_unreachable_dashboard_says_so_in_one_line(tmp_path, capsys):
    from conftest import write_study

    from study.cli import main

    path = write_study("fifo", tmp_path)
    assert main(["sweep", str(path), "--submit", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--submit" in err and "http://127.0.0.1:9" in err and "ray dashboard" in err
    assert main(["sweep", str(tmp_path / "none.yaml"), "--submit"]) == 2
    assert "no such study file" in capsys.readouterr().err
