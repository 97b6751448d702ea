"""The benchmark scripts' quick modes run and print their figures (the figures themselves are not asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rows(text: str, first: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first]]


NUMBER = re.compile(r"^\d+(\.\d+)?$")


def test_step_prints_the_floor_and_each_implementation():
    out = run("step.py", "--quick", "--configs", "ntm", "--impl", "fused", "fused-torchopt", "--threads", "1")
    impls = [r[1] for r in rows(out, "ntm")]
    assert impls == ["floor", "fused", "fused-torchopt"]
    for r in rows(out, "ntm")[1:]:
        assert NUMBER.match(r[2]) and NUMBER.match(r[5]), r  # ms and ratio to the floor


def test_gpu_script_runs_end_to_end_on_cpu():
    """bench/gpu.py --device cpu --quick: every table of the GPU script, at tiny sizes, so the script is known to
    run before a GPU is lent (the compiled step on inductor's CPU backend, packed trials, folded seeds)."""
    out = run("gpu.py", "--device", "cpu", "--quick", "--threads", "1")
    assert [r[1] for r in rows(out, "ntm-tiny")] == ["reference", "compiled", "fused"], out
    for r in rows(out, "ntm-tiny"):
        assert NUMBER.match(r[3]) and NUMBER.match(r[4]), r  # ms and first-step seconds
    tables = out.split("\n## ")[1:]
    assert [t.split()[0] for t in tables] == ["step", "packed", "seeds"], out
    packed = [line.split() for line in tables[1].splitlines()[2:] if line.strip()]
    assert [r[0] for r in packed] == ["1", "2"] and all(NUMBER.match(r[1]) for r in packed), tables[1]
    seeds = [line.split() for line in tables[2].splitlines()[2:] if line.strip()]
    assert [r[0] for r in seeds] == ["1", "2"] and all(NUMBER.match(r[1]) for r in seeds), tables[2]


def test_optim_prints_both_optimizers_for_every_model():
    out = run("optim.py", "--iters", "3", "--threads", "1")
    for model in ("ntm", "dnc64", "ntm-tiny"):
        kinds = [r[3] for r in rows(out, model)]
        assert kinds == ["rmsprop", "adam"], out
        for r in rows(out, model):
            assert all(NUMBER.match(v) for v in r[4:6]), r


@pytest.mark.slow
def test_seeds_prints_one_seed_and_eight():
    out = run("seeds.py", "--quick", "--configs", "ntm", "--threads", "1")
    (r,) = rows(out, "ntm")
    assert all(NUMBER.match(v) for v in (r[1], r[3], r[5])), r


def test_protocols_prints_a_step_time_for_each_protocol():
    out = run("protocols.py", "--steps", "2", "--warmup", "1", "--protocols", "collier_ntm", "csordas_dnc_mds")
    for name, batch in (("collier_ntm", "32"), ("csordas_dnc_mds", "16")):
        (r,) = rows(out, name)
        assert r[1] == batch and all(NUMBER.match(v) for v in (r[3], r[4], r[6])), r
