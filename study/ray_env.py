"""Ray's and Tune's environment for every mannstudy process, set when this module is imported.

Ray and Tune read these variables when they are imported or when their controller starts, so every module
of ``study`` that imports ray imports this module first. A value already in the environment is kept.
This module imports nothing from the project (``tests/test_architecture.py`` keeps it a leaf).
"""

from __future__ import annotations

import os

RAY_ENV = {
    # Snapshot the experiment state after every event: with the default (~10 s) a driver killed right
    # after a trial finished re-runs that trial on --resume.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    # No TensorBoard/CSV loggers per trial: MLflow is the record (the JSON logger is added back
    # explicitly: Tune's ResultGrid reads result.json).
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Our own one-line progress instead of Ray's table.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Trials Tune keeps asked but waiting for resources: one, unless run_sweep sets the study's own
    # (pending_trials). A trial asked but never started is an orphan if the driver dies (reconcile()
    # then marks it not_run).
    "TUNE_MAX_PENDING_TRIALS_PG": "1",
    # A local Ray (started by connect_ray) would prestart one idle worker per CPU when the driver connects and
    # make ray.init wait for them; Tune never uses them (its trial actors carry a runtime_env, so they get
    # workers of their own). 2 CPUs: ray.init 5.3 s -> 2.3 s, and ~0.9 CPU s of idle workers saved. Ray's
    # RAY_<config> variable for its prestart_worker_first_driver setting; no effect on a cluster started apart.
    "RAY_prestart_worker_first_driver": "0",
    # Ctrl+C raises KeyboardInterrupt in the driver (the study run is KILLED, --resume continues the trials that
    # were running) instead of Tune's handler, which would stop every running trial as if the search had: each
    # would run its final evaluation and be recorded stopped_early, ended for good.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}
PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
PENDING_GIVEN = os.environ.get(PENDING_ENV)  # a value set before mannstudy's is kept for every study
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
