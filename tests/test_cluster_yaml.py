"""cluster.yaml against Ray's own launcher schema, offline: no cloud, no network, no SSH."""

import copy
import re
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
        assert re.search(rf'export {name}="{scheme}', setup), name


def test_the_documented_on_prem_switch_is_valid(raw):
    """The header's recipe: provider type local, node types removed (Ray derives them)."""
    local = copy.deepcopy(raw)
    local["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    del local["available_node_types"], local["head_node_type"]
    local["auth"]["ssh_private_key"] = "~/.ssh/id_ed25519"
    config = prepare_config(local)
    validate_config(config)
    assert config["provider"]["type"] == "local" and config["max_workers"] == 2
