"""What ``--resume`` restores, kept where Tune never writes: the one place a driver's durability lives.

The guarantee (``mannstudy sweep`` and ``mannstudy replicate``): whatever moments the driver is
SIGKILLed at, any number of times, a final ``--resume`` finishes the run with every trial accounted
for once: one MLflow child run per trial with a terminal status, Optuna agreeing, no trial that had
ended trained again, no run left RUNNING, the parent run FINISHED.

Three stores, three roles:

- MLflow (each trial's run status, written by the trial) and Optuna (written by the driver's searcher)
  are the record of what has ended. A restored trial reads its run before it trains, with or without
  a checkpoint (``study.trainable._recorded_end``); before a restore the driver copies Optuna's
  verdicts onto runs a killed trial left RUNNING (``study.sweep.reconcile(..., lost=False)``).
- Tune's experiment folder (``<results_dir>/ray/<experiment>/``) says what to run next. Tune writes it
  in place and copies its staging folder over it after every save, ``tuner.pkl`` included, so any file
  in it can be torn by a kill, and any file put there is copied back over later.
- This module's folder, ``<results_dir>/ray/.mannstudy/<experiment>/``, outside anything Tune copies::

      begun       written before the run records anything: a --resume with no Tune state starts it afresh
      tuner.pkl   Tune's tuner.pkl as written when the run started (Tune's copy can be torn later)
      state.pkl   Tune's experiment, searcher and callback state files of the newest complete save

  Every write is atomic: a reader sees the old file or the new one, whole. On a local or shared
  (NFS) folder that is a temporary file, fsync, rename, fsync of the folder; in object storage
  (``s3://…``) one PUT, which replaces an object whole. :func:`prepare_restore` puts them back before
  ``Tuner.restore``.

A location is a local path or a URI (``s3://bucket/prefix``, any filesystem pyarrow resolves, as Tune
does for its ``storage_path``); every file operation here goes through :func:`filesystem`, so a
results folder in a bucket is read and written by the same code as a local one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import posixpath
import re
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

# isort: off
import study.ray_env  # noqa: F401  (sets Ray's environment before ray is imported)
from ray.tune import Callback, Stopper
# isort: on

class StateError(RuntimeError):
    """A run whose kept state cannot be restored (one line naming what to do; exit code 2)."""


STATE_FOLDER = ".mannstudy"  # under <results_dir>/ray, beside Tune's experiment folders
BEGUN, TUNER_COPY, STATE_BUNDLE = "begun", "tuner.pkl", "state.pkl"
TUNER_PKL = "tuner.pkl"  # Tune's name, in its experiment folder
# Tune's state files, as its TuneController, searcher and callback list name them
STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json", "callback-states-*.pkl")
STALL_S = 30.0  # nothing live and nothing new for this long: the driver can make no progress


Location = str | os.PathLike  # a local path or a URI such as s3://bucket/prefix


def is_uri(location: Location) -> bool:
    return "://" in str(location)


def join(location: Location, *names: str) -> str:
    """``location/name/...`` for a path or a URI (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    return posixpath.join(str(location), *names)


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}  # scheme://bucket -> its filesystem (resolving one asks the server)


def filesystem(location: Location) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI, resolved as Tune resolves its storage_path.

    An object store's path is ``bucket/key``; its filesystem is resolved once per bucket (pyarrow asks the
    server for the bucket's region)."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme, _, rest = location.partition("://")
    if scheme not in ("s3", "gs"):
        return pafs.FileSystem.from_uri(location)
    root = f"{scheme}://{rest.split('/', 1)[0]}"
    if root not in _FILESYSTEMS:
        _FILESYSTEMS[root] = pafs.FileSystem.from_uri(root)[0]
    return _FILESYSTEMS[root], rest.rstrip("/")


def is_file(location: Location) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: Location) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(location: Location) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.readall()


def names(folder: Location, pattern: str = "*") -> list[str]:
    """Names of the entries of ``folder`` that match ``pattern`` (fnmatch), sorted; none when it does not exist."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if fnmatch.fnmatchcase(info.base_name, pattern))


def move(source: Location, target: Location) -> None:
    fs, path = filesystem(source)
    fs.move(path, filesystem(target)[1])


def state_dir(exp_dir: Location) -> str:
    """``<results_dir>/ray/.mannstudy/<experiment>`` for Tune's ``<results_dir>/ray/<experiment>``."""
    exp_dir = str(exp_dir).rstrip("/")
    return join(posixpath.dirname(exp_dir), STATE_FOLDER, posixpath.basename(exp_dir))


def write_atomically(location: Location, data: bytes) -> None:
    """Replace ``location`` by ``data`` so that a reader, or a kill at any moment, sees the old file or the new one."""
    if is_uri(location):  # an object is replaced whole by one PUT
        fs, path = filesystem(location)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def mark_begun(exp_dir: Location) -> None:
    """Before the run records anything (Optuna, MLflow, Tune): from now on ``--resume`` can finish it."""
    write_atomically(join(state_dir(exp_dir), BEGUN), b"")


def has_begun(exp_dir: Location) -> bool:
    return is_file(join(state_dir(exp_dir), BEGUN))


def has_tune_state(exp_dir: Location) -> bool:
    """True when Tune saved an experiment state (the bundle here, or a file in its folder)."""
    return is_file(join(state_dir(exp_dir), STATE_BUNDLE)) or bool(names(exp_dir, "experiment_state-*.json"))


def keep_tuner_copy(exp_dir: Location) -> None:
    """Right after ``tune.Tuner(...)`` wrote ``tuner.pkl``: keep a copy of it here."""
    write_atomically(join(state_dir(exp_dir), TUNER_COPY), read_bytes(join(exp_dir, TUNER_PKL)))


class StateBackupCallback(Callback):
    """Keeps Tune's state files of the newest complete save in ``state.pkl``, for ``--resume``.

    Tune writes its state files in a staging folder and a background thread copies that folder over
    its experiment folder. It calls each callback's ``get_state`` right after writing the experiment
    state and the searcher's (``TuneController.save_to_dir``): then they are complete in the staging
    folder, and they are bundled into one file, written atomically outside anything Tune copies.
    (The callback states in the bundle are those of the save before: Tune writes them after this call.)
    """

    def __init__(self, exp_dir: Location):
        self.exp_dir = str(exp_dir)
        self._staging: str | None = None  # Tune's staging folder, known once a trial exists

    def on_step_begin(self, iteration, trials, **info):
        if self._staging is None and trials:  # a restored run saves before its first trial starts
            self._staging = trials[0].storage.experiment_driver_staging_path

    def on_trial_start(self, iteration, trials, trial, **info):
        self._staging = trial.storage.experiment_driver_staging_path

    def get_state(self) -> None:
        if self._staging is not None:
            files = {}
            for pattern in STATE_FILES:
                newest = max(Path(self._staging).glob(pattern), default=None)
                if newest is not None:
                    files[newest.name] = newest.read_bytes()
            if any(name.startswith("experiment_state-") for name in files):
                write_atomically(join(state_dir(self.exp_dir), STATE_BUNDLE), pickle.dumps(files))
        return None  # nothing of its own for Tune to save

    def __getstate__(self):  # pickled into tuner.pkl before any trial: the staging folder is per session
        return {**self.__dict__, "_staging": None}


def _loads(data: bytes) -> bool:
    try:
        pickle.loads(data)
    except Exception:
        return False
    return True


def prepare_restore(exp_dir: Location, what: str) -> bool:
    """Before ``Tuner.restore``: put back the state kept here; False when there is no Tune state to restore.

    - ``tuner.pkl``: the kept copy replaces Tune's when they differ (Tune's may be torn).
    - ``state.pkl``: its files replace Tune's; an experiment state file named after the bundle's (written
      after the newest complete save, perhaps torn) is set aside as ``*.stale``, since Tune restores from the
      newest name.
    - A trial whose newest checkpoint has gone resumes from its newest checkpoint that exists, or restarts.
    Raises StateError (one line naming ``what`` and what to do) for a state that cannot be restored.
    """
    exp_dir = str(exp_dir)
    kept = state_dir(exp_dir)
    if not has_tune_state(exp_dir):
        return False
    live = join(exp_dir, TUNER_PKL)
    if is_file(join(kept, TUNER_COPY)):
        good = read_bytes(join(kept, TUNER_COPY))
        if not is_file(live) or read_bytes(live) != good:
            write_atomically(live, good)
    elif not is_file(live) or not _loads(read_bytes(live)):
        raise StateError(f"{what}: --resume: {live} is damaged and there is no copy in {kept}; the run cannot be "
                         f"resumed (start it again under another name or results_dir)")
    if is_file(join(kept, STATE_BUNDLE)):
        files = pickle.loads(read_bytes(join(kept, STATE_BUNDLE)))
        for name, data in files.items():
            write_atomically(join(exp_dir, name), data)
        session = _session(max(n for n in files if n.startswith("experiment_state-")))
        for pattern in STATE_FILES:  # Tune restores each kind from its newest name: none may be newer than these
            for name in names(exp_dir, pattern):
                if _session(name) > session:
                    move(join(exp_dir, name), join(exp_dir, name + ".stale"))
    newest_state = join(exp_dir, max(names(exp_dir, "experiment_state-*.json")))
    try:
        state = json.loads(read_bytes(newest_state))
    except ValueError as err:
        raise StateError(f"{what}: --resume: Tune's experiment state {newest_state} is damaged ({err}) and there is "
                         f"no complete copy in {kept}; the run cannot be resumed (start it again under another "
                         "name or results_dir)") from None
    if repair_checkpoints(state, exp_dir):
        write_atomically(newest_state, json.dumps(state).encode())
    return True


def _session(name: str) -> str:
    """``2026-01-01_00-00-00`` of ``experiment_state-2026-01-01_00-00-00.json``: the Tune session that wrote it."""
    found = re.search(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", name)
    return found.group(0) if found else ""


def _usable_checkpoint(path: Location) -> bool:
    """A checkpoint folder whose upload finished: its metadata (written before the upload) parses, and no file
    in it is empty."""
    try:
        json.loads(read_bytes(join(path, ".metadata.json")))
    except (OSError, ValueError):
        return False
    fs, folder = filesystem(path)
    files = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return all(f.size > 0 for f in files if f.type == pafs.FileType.File)


def repair_checkpoints(state: dict, exp_dir: Location) -> list[str]:
    """Point each trial of Tune's experiment ``state`` (parsed JSON, changed in place) whose newest checkpoint
    is gone at its newest usable checkpoint folder, or at none (the trial restarts); return the trial folders
    changed. Paths are matched by trial folder and checkpoint name, so a moved results folder still matches.
    """
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    def here(path: str) -> str:
        return join(exp_dir, posixpath.basename(posixpath.dirname(path)), posixpath.basename(path))

    changed = []
    for i, (trial_json, metadata_json) in enumerate(state.get("trial_data", [])):
        metadata = _TrainingRunMetadata.from_json_state(metadata_json)
        manager = metadata.checkpoint_manager
        if manager is None or manager.latest_checkpoint_result is None:
            continue
        latest = manager.latest_checkpoint_result
        # Tune deletes a trial's older checkpoints by these entries, and fails when one is gone already
        kept = [r for r in manager._checkpoint_results if is_dir(here(r.checkpoint.path))]
        if is_dir(here(latest.checkpoint.path)):
            if len(kept) == len(manager._checkpoint_results):
                continue
        else:
            old = latest.checkpoint
            trial_dir = posixpath.dirname(here(old.path))
            usable = next((name for name in reversed(names(trial_dir, "checkpoint_*"))
                           if _usable_checkpoint(join(trial_dir, name))), None)
            manager._latest_checkpoint_result = None  # none usable: the trial restarts
            if usable is not None:
                manager._latest_checkpoint_result = _TrainingResult(
                    checkpoint=Checkpoint(path=posixpath.join(posixpath.dirname(old.path), usable),
                                          filesystem=old.filesystem),
                    metrics={})
                usable_here = join(trial_dir, usable)
                kept = [r for r in kept if here(r.checkpoint.path) != usable_here] + [manager._latest_checkpoint_result]
        manager._checkpoint_results = kept
        metadata.invalidate_cache()
        state["trial_data"][i] = [trial_json, metadata.get_json_state()]
        changed.append(posixpath.basename(posixpath.dirname(here(latest.checkpoint.path))))
    return changed


_STALLED: dict[str, float] = {}  # NoProgress key -> when the driver was found stalled (this process)


class NoProgress(Callback, Stopper):
    """Ends a Tune run that can make no progress: no trial pending, running or paused for ``STALL_S`` seconds
    while the searcher adds none (every remaining trial failed to restore, say). Tune would wait forever.

    Given to the Tuner as both a callback (it sees the trials after every step) and its stopper (Tune asks it
    whether to stop everything); the two copies Tune may hold share their verdict through ``_STALLED``.
    """

    def __init__(self, stall_s: float = STALL_S, stream=None):
        self.key = uuid.uuid4().hex
        self.stall_s = stall_s
        self.stream = stream  # None: sys.stdout at the time of printing
        self._idle_since: float | None = None

    def on_step_end(self, iteration, trials, **info):
        live = any(t.status in ("PENDING", "RUNNING", "PAUSED") for t in trials)
        now = time.monotonic()
        if live or not trials:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= self.stall_s and self.key not in _STALLED:
            _STALLED[self.key] = now
            failed = sum(1 for t in trials if t.status == "ERROR")
            print(f"no progress: no trial has run for {self.stall_s:.0f} s and none can start ({len(trials)} trials, "
                  f"{failed} failed); ending the run", file=self.stream or sys.stdout, flush=True)

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.key in _STALLED

    def __getstate__(self):
        return {**self.__dict__, "_idle_since": None, "stream": None}
