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


@pytest.fixture(scope="module")
def pg_sweep(postgres, ray_cluster, study_file, record, tmp_path_factory):
    """A tiny sweep with Optuna and MLflow on PostgreSQL; returns what it printed and left behind."""
    from study.sweep import run_sweep

    folder = tmp_path_factory.mktemp("pg")
    pgpass = postgres.write_pgpass(folder / "pgpass")
    # The MLflow server's command line names no password: libpq reads it from the password file.
    server = MlflowServer(folder / "mlflow", backend_uri=postgres.url("mlflow", with_password=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSFILE", str(pgpass))
        server.start(timeout_s=180)
    try:
        path = study_file("fifo", folder, fresh=True, name="pg", tracking_uri=server.url,
                          storage=postgres.url("optuna"), budget={"num_samples": 2, "max_steps": 20})
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            summary = run_sweep(path)
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        yield {"path": path, "summary": summary, "printed": out.getvalue() + err.getvalue(), "rec": record(path),
               "server": server, "cmdline": cmdline}
    finally:
        server.stop()


@pytest.mark.slow
def test_a_sweep_runs_end_to_end_on_postgresql(pg_sweep, postgres):
    rec = pg_sweep["rec"]
    assert rec.spec.storage.startswith("postgresql://") and pg_sweep["server"].backend_uri.startswith("postgresql://")
    trials = rec.trials()  # read back from PostgreSQL
    assert len(trials) == 2 and all(t.user_attrs["status"] == "completed" for t in trials)
    assert pg_sweep["summary"].counts == {"completed": 2}
    children = rec.children()  # from the MLflow server, whose store is the mlflow database
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert all(len(rec.history(r.info.run_id, "error")) == 2 for r in children)  # steps 10 and 20
    # the rows really are in PostgreSQL, not in a SQLite file beside the server
    import psycopg

    with psycopg.connect(postgres.url("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == 3  # the study run and its two trials
    assert not list(Path(pg_sweep["server"].workdir).glob("*.db"))


@pytest.mark.slow
def test_the_password_is_nowhere_in_the_record(pg_sweep, tmp_path):
    import mlflow

    rec = pg_sweep["rec"]
    parent, = rec.parents()
    # recorded, but masked: the record still says which database held the study
    assert parent.data.params["storage"] == postgres_url_masked(rec.spec.storage)
    texts = {"printed": pg_sweep["printed"], "mlflow server command line": pg_sweep["cmdline"]}
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


def test_a_local_s3_server_serves_boto3_and_pyarrow(tmp_path, monkeypatch):
    """The fixture object-storage tests build on: moto's standalone S3 server on 127.0.0.1, reached by boto3
    and by pyarrow's S3 filesystem (the one Ray Tune uses for an s3:// storage path) through the standard
    endpoint variables, as a real bucket is."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra has it)")
    import boto3
    import pyarrow.fs as pafs
    from s3_server import S3Server

    with S3Server(tmp_path / "s3") as s3:
        print(f"\nmoto S3 server answering after {s3.start_s:.2f} s")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="results")
        client.put_object(Bucket="results", Key="study/by-boto3.txt", Body=b"boto3")
        fs, path = pafs.FileSystem.from_uri("s3://results/study")
        assert isinstance(fs, pafs.S3FileSystem) and path == "results/study"
        with fs.open_output_stream("results/study/by-pyarrow.txt") as out:
            out.write(b"pyarrow")
        listed = sorted(info.path for info in fs.get_file_info(pafs.FileSelector("results/study")))
        assert listed == ["results/study/by-boto3.txt", "results/study/by-pyarrow.txt"]
        assert client.get_object(Bucket="results", Key="study/by-pyarrow.txt")["Body"].read() == b"pyarrow"
