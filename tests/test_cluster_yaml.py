"""cluster.yaml against Ray's own launcher schema, offline: no cloud, no network, no SSH."""

import copy
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from study.spec import RESULTS_ENV, STORAGE_ENV, TRACKING_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key) or [])


def test_ray_accepts_the_config_and_the_node_types_are_as_documented(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert prepared["provider"]["type"] == "aws"
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu_workers = [t for name, t in types.items() if name != prepared["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_workers and all(t["node_config"]["InstanceType"][:2] in ("g5", "g6") for t in gpu_workers)
    for node_type in types.values():
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in node_type["resources"].values())


def test_ray_rejects_a_fractional_resource(raw):
    """The check above is the one Ray makes: its schema wants whole numbers."""
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_a10g"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_every_node_installs_this_package_from_the_checkout(raw, prepared):
    # file_mounts copies the repository (ray up runs from its root) to ~/mannstudy ...
    (remote, local), = raw["file_mounts"].items()
    assert local == "." and (ROOT / local / "pyproject.toml").exists()
    # ... and the common setup installs it there, on the head (merged by Ray) and on the workers.
    install = re.compile(r"pip install .*-e " + re.escape(remote) + r"(\s|$)")
    assert install.search(commands(raw, "setup_commands"))
    assert install.search(commands(prepared, "head_setup_commands"))
    assert install.search(commands(prepared, "worker_setup_commands"))


def test_the_head_runs_postgresql_and_the_mlflow_server(raw):
    setup = commands(raw, "head_setup_commands")
    assert "postgresql" in setup and "createdb" in setup and "optuna" in setup and "mlflow" in setup
    start = commands(raw, "head_start_ray_commands")
    assert "ray start --head" in start
    mlflow = re.search(r"mlflow server(.*?)(?:'|$)", start, re.S)
    assert mlflow, "the head must start an MLflow server"
    args = mlflow.group(1)
    assert re.search(r"--backend-store-uri \"?postgresql://", args) and "--host 0.0.0.0" in args
    assert "--artifacts-destination s3://" in args  # artifacts on shared storage, proxied by the server
    assert "mlflow" not in commands(raw, "worker_start_ray_commands")


def test_the_head_exports_the_defaults_study_files_read(raw):
    """The same study files run on the cluster: the head sets what study.spec reads when a file names no URI."""
    setup = commands(raw, "head_setup_commands")
    for name, scheme in ((TRACKING_ENV, "http://"), (STORAGE_ENV, "postgresql://"), (RESULTS_ENV, "s3://")):
        assert re.search(rf'export {name}="?{scheme}', setup), name


def test_the_documented_on_prem_switch_is_valid(raw):
    """The header's recipe: provider type local, node types removed (Ray derives them)."""
    local = copy.deepcopy(raw)
    local["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    del local["available_node_types"], local["head_node_type"]
    local["auth"]["ssh_private_key"] = "~/.ssh/id_ed25519"
    config = prepare_config(local)
    validate_config(config)
    assert config["provider"]["type"] == "local" and config["max_workers"] == 2


# ------------------------------------------------------------------------------------------------ first boot


def test_every_node_type_boots_one_pinned_ubuntu_22_04_image(raw):
    """Ray's default AWS image (Ubuntu 18.04) has a glibc too old for torch 2.13's wheels."""
    text = (ROOT / "cluster.yaml").read_text()
    images = {name: t["node_config"].get("ImageId") for name, t in raw["available_node_types"].items()}
    assert all(images.values()), images
    assert len(set(images.values())) == 1  # one image: the same Python, glibc and torch everywhere
    assert re.fullmatch(r"ami-[0-9A-Za-z-]+", next(iter(images.values())))
    # how to find the current ID per region
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text


def test_worker_instance_profiles_are_documented_with_their_policy(raw):
    """The head launches workers with an instance profile only if its own role may pass that role."""
    runbook = (ROOT / "docs" / "cluster.md").read_text()
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for name, t in raw["available_node_types"].items()
                if name != raw["head_node_type"] and "IamInstanceProfile" in t["node_config"]}
    for profile in profiles:
        assert profile != "ray-autoscaler-v1"  # the head's own, broad role: not for trials
        assert profile in runbook and "iam:PassRole" in runbook and '"s3:PutObject"' in runbook


def test_first_boot_waits_for_dpkg_and_survives_a_missing_compiler(prepared):
    every = "\n".join(commands(prepared, key) for key in ("head_setup_commands", "worker_setup_commands"))
    apt = [line for line in every.splitlines() if "apt-get" in line]
    assert apt and all("DPkg::Lock::Timeout=" in line for line in apt), apt
    native = [line for line in every.splitlines() if "mann.native" in line]
    assert native and all(re.search(r"mann\.native\s*\|\|\s*true", line) for line in native), native


def test_no_command_line_carries_the_database_password(raw, prepared):
    """libpq reads the password from ~/.pgpass: neither the MLflow server's arguments nor the study defaults
    (logged as the study's storage param) hold it."""
    every = "\n".join(commands(prepared, key) for key in
                      ("head_setup_commands", "head_start_ray_commands", "worker_setup_commands"))
    assert ".pgpass" in every and "umask 077" in every
    for url in re.findall(r"postgresql://\S+", every):
        assert re.match(r"postgresql://[^:@/]+@", url), url  # a user, no password


def test_the_head_writes_an_env_file_mannstudy_reads_without_a_shell(raw, tmp_path, monkeypatch):
    """Run the head's commands that write ~/.pgpass and ~/mannstudy.env (bash, HOME in a temporary folder),
    then read the file as a `ray job submit` driver does: study.spec.cluster_env, no shell involved."""
    from study.spec import cluster_env

    setup = [c for c in raw["head_setup_commands"] if "mannstudy.env" in c or ".pgpass" in c]
    (tmp_path / ".mannstudy_db_password").write_text("0123abcd\n")
    (tmp_path / ".bashrc").write_text("")
    for command in setup:
        subprocess.run(["bash", "-c", command], check=True, env={**os.environ, "HOME": str(tmp_path)})
    assert (tmp_path / ".pgpass").read_text() == "localhost:5432:*:mannstudy:0123abcd\n"
    assert (tmp_path / ".pgpass").stat().st_mode & 0o077 == 0  # libpq ignores a file others can read
    for key in (STORAGE_ENV, TRACKING_ENV, RESULTS_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MANNSTUDY_ENV_FILE", str(tmp_path / "mannstudy.env"))
    env = cluster_env()
    assert env[STORAGE_ENV] == "postgresql://mannstudy@localhost:5432/optuna"
    assert re.fullmatch(r"http://[0-9a-f.:]+:5000", env[TRACKING_ENV]), env[TRACKING_ENV]
    assert env[RESULTS_ENV].startswith("s3://")
    assert "0123abcd" not in (tmp_path / "mannstudy.env").read_text()
