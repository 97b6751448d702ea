"""mann.native: building mann/csrc's kernels once per machine, from several processes at once."""

import os
import subprocess
import sys
import time

import pytest

from mann import native

LOAD_AND_USE = """
import torch
from mann import native
cell = native.kernels("lstm_cell")
assert cell is not None, native._why_not
h, c, act, tanh_c = cell.cell_forward(torch.zeros(2, 12), torch.zeros(2, 3))
print(native.build_dir("lstm_cell"), float(c.sum()))
"""


@pytest.mark.slow
def test_processes_building_at_once_share_one_build(tmp_path):
    """Two fresh processes (as two Ray workers on a node nobody prebuilt) ask for a kernel at the same moment:
    one builds, the other waits for that build (torch's lock in the folder) and both get a working module."""
    env = {**os.environ, "MANN_NATIVE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_USE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == [str(tmp_path / native.build_dir("lstm_cell").name), "0.0"]
    built = list(tmp_path.glob("lstm_cell-*/mann_lstm_cell.so"))
    assert len(built) == 1 and not (built[0].parent / "lock").exists()


def test_the_build_folder_names_source_torch_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("MANN_NATIVE_DIR", str(tmp_path))
    first = native.build_dir("lstm_cell")
    assert first.parent == tmp_path and first.name.startswith("lstm_cell-")
    monkeypatch.setattr(native, "CFLAGS", [*native.CFLAGS, "-DSOMETHING_ELSE"])
    assert native.build_dir("lstm_cell") != first  # other flags: another folder, never a stale library


def test_a_lock_left_by_a_dead_build_is_cleared_a_live_one_kept(tmp_path):
    """torch's loader waits as long as the lock file exists: one left by a killed build would hang every later
    process on the machine. A lock older than any build is removed; a recent one (a build running) stays."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "lock").write_text("")
    stale = time.time() - native.STALE_LOCK_S - 60
    os.utime(old / "lock", (stale, stale))
    native._clear_stale_lock(old)
    native._clear_stale_lock(new)
    native._clear_stale_lock(tmp_path / "never-built")  # no folder, no lock: nothing to do
    assert not (old / "lock").exists() and (new / "lock").exists()


@pytest.mark.skipif(not native.OPENMP, reason="torch without OpenMP (or not Linux): the kernels' rows run serially")
def test_the_kernels_split_their_rows_across_torch_threads():
    """at::parallel_for in the kernels uses torch's thread count: a build without -fopenmp ran every row on the
    calling thread at any count (the fused steps then lost to the ops at 2 threads)."""
    import torch

    cell = native.kernels("lstm_cell")
    assert cell is not None, native._why_not
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cell.threads_for(16, 8) == 2
        assert cell.threads_for(16, 16) == 1  # one grain's worth of rows: one thread
        torch.set_num_threads(1)
        assert cell.threads_for(16, 1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(not native.OPENMP, reason="torch without OpenMP (or not Linux): nothing to fall back from")
def test_a_compiler_without_openmp_still_gets_the_kernels(monkeypatch, tmp_path):
    """Where the OpenMP build fails (here: a flag g++ does not know, as a compiler without OpenMP rejects
    -fopenmp), the kernels are built without it, with a warning; later calls go straight to that build."""
    import torch

    monkeypatch.setenv("MANN_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP", ["-fno-such-openmp-flag"])
    monkeypatch.setattr(native, "CFLAGS", [*native.SERIAL_CFLAGS, "-fno-such-openmp-flag"])
    with pytest.warns(RuntimeWarning, match="could not be built with OpenMP"):
        cell = native.build("lstm_cell")
    h, c, act, tanh_c = cell.cell_forward(torch.zeros(2, 12), torch.zeros(2, 3))
    assert float(c.sum()) == 0.0
    assert (native.build_dir("lstm_cell") / native.OPENMP_FAILED).exists()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cell.threads_for(16, 8) == 1  # serial, as built
    finally:
        torch.set_num_threads(before)

    tried, load = [], native._load

    def spy(name, folder, *flags):
        tried.append(folder)
        return load(name, folder, *flags)

    monkeypatch.setattr(native, "_load", spy)
    native.build("lstm_cell")
    assert tried == [native.build_dir("lstm_cell", native.SERIAL_CFLAGS)]


@pytest.mark.skipif(not native.OPENMP, reason="torch without OpenMP (or not Linux): nothing to fall back from")
def test_a_build_that_fails_either_way_marks_nothing(monkeypatch, tmp_path):
    """When the build without OpenMP fails too (here: a flag g++ does not know in both), the fault is not
    OpenMP's: nothing records it, so a later process (say, after a compiler was installed) tries OpenMP again."""
    monkeypatch.setenv("MANN_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "SERIAL_CFLAGS", [*native.SERIAL_CFLAGS, "-fno-such-flag"])
    monkeypatch.setattr(native, "CFLAGS", [*native.SERIAL_CFLAGS, *native.OPENMP])
    with pytest.raises(Exception, match="mann_lstm_cell"):
        native.build("lstm_cell")
    assert not (native.build_dir("lstm_cell") / native.OPENMP_FAILED).exists()
