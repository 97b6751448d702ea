"""The MLflow record of a study: run kinds, tag names, status values, artifact names.

The vocabulary both sides of the record share: :mod:`study.tracking` writes it (and is the only module
that talks to MLflow), :mod:`analysis.load` and the report read it. No project imports, so the analysis
can read a record without importing the sweep.

Layout::

    experiment <study>                         one per study (the study's name); tags: TAG_EXPERIMENT_KIND,
                                               TAG_VIEW (the runs table's columns and sort order)
      run kind=study                           the study's parent run
          TAG_KIND=study, TAG_STUDY=<study>    params: the spec as dotted keys; artifacts: the study file,
          TAG_RESULTS_DIR, TAG_GIT_COMMIT,     SPEC_FILE; after a sweep or replication, the summary metrics
          TAG_GIT_DIRTY, TAG_VERSION_PREFIX*,  SUMMARY_PREFIX* and the report under REPORT_DIR/
          TAG_NOTE (description, outcome), TAG_STOP=time_budget once the time budget is spent
        run kind=trial                         one per trial of the search (get-or-create by trial id)
            TAG_KIND=trial, TAG_TRIAL_ID,      params: the trial's TrainConfig as dotted keys; metrics: one
            TAG_PARENT=<study run>, TAG_STUDY, point per evaluation step
            TAG_STATUS (+ TAG_STATUS_PREFIX*), TAG_ATTEMPTS, TAG_SEED, TAG_MODEL, TAG_NODE, TAG_NODE_IP,
            TAG_TRIAL_NAME (Tune's), TAG_NOTE (how it ended, in words), TAG_STOP=scheduler (when ASHA stops it)
        run kind=replication                   one per replication of the study's best configurations
            TAG_KIND=replication, TAG_REPLICATION=<id>, TAG_STUDY, TAG_STUDY_RUN=<study run>,
            TAG_PARENT=<study run>, TAG_REPLICATION_SEEDS, provenance (TAG_GIT_COMMIT, TAG_VERSION_PREFIX*...);
            artifact REPLICATION_FILE
          run kind=trial                       one per (configuration, seed), tagged as a search's trial;
                                               TAG_TRIAL_ID=<replication id>.c<i>.s<seed>

A trial's status tag is ``running`` while it runs (or is retried), then one of ``STATUS_TO_RUN_STATUS``;
that table gives the MLflow run status each end sets (``stopped_early`` is FINISHED: a decision of the
search, not a fault).
"""

from __future__ import annotations

# Run kinds: the value of TAG_KIND.
KIND_STUDY = "study"  # a study's parent run
KIND_TRIAL = "trial"  # one trial (or one replicated configuration and seed)
KIND_REPLICATION = "replication"  # a replication's parent run, nested under the study's

# Tags of this project.
TAG_KIND = "mannstudy.kind"
TAG_STUDY = "mannstudy.study"  # the study's name, on every kind of run
TAG_RESULTS_DIR = "mannstudy.results_dir"  # the study's results folder, on the study run
TAG_TRIAL_ID = "mannstudy.trial_id"  # Tune's trial id; a replication's run key
TAG_TRIAL_NAME = "mannstudy.trial_name"  # Tune's trial name: finds a trial's checkpoints
TAG_STATUS = "mannstudy.status"  # RUNNING or a key of STATUS_TO_RUN_STATUS
TAG_STATUS_PREFIX = "mannstudy.status_"  # status_step, status_message, any other detail of the end
TAG_NODE = "mannstudy.node"
TAG_NODE_IP = "mannstudy.node_ip"
TAG_SEED = "mannstudy.seed"
TAG_MODEL = "mannstudy.model"
TAG_ATTEMPTS = "mannstudy.attempts"  # 1, then one more each time a retried or resumed trial attaches
# The search decided to stop a trial: "scheduler" on the trial's run (ASHA), "time_budget" on the study run.
# Written by the driver before Tune stops the trial; a trial stopped without it is being torn down with its sweep.
TAG_STOP = "mannstudy.stop"
TAG_VERSION_PREFIX = "mannstudy.version."  # + package name
TAG_GIT_DIRTY = "mannstudy.git_dirty"
TAG_REPLICATION = "mannstudy.replication"  # a replication's id
TAG_STUDY_RUN = "mannstudy.study_run"  # the run id of the study a replication replicates
TAG_REPLICATION_SEEDS = "mannstudy.replication_seeds"  # the replication's seeds, as JSON

# MLflow's own tags, with the meaning the MLflow UI gives them.
TAG_PARENT = "mlflow.parentRunId"  # nests a run under another
TAG_NOTE = "mlflow.note.content"  # a run's description
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# The MLflow 3 UI opens an experiment in its GenAI view unless told otherwise: the experiment tag (read when
# the UI has no workflow switch) and the workflowType URL parameter (read when it has one) both ask for runs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A runs-table view (columns, sort order) stored as an experiment tag: the UI applies it when the URL names
# it (``viewStateShareKey``), as it does for a view a user shared.
VIEW_KEY = "mannstudy"
TAG_VIEW = "mlflow.sharedViewState." + VIEW_KEY

# Trial status (TAG_STATUS) -> MLflow run status.
STATUS_TO_RUN_STATUS = {
    "completed": "FINISHED",  # ran its full budget (or converged)
    "stopped_early": "FINISHED",  # stopped by the scheduler: not KILLED, which the UI draws like a crash
    "diverged": "FAILED",  # NaN/Inf loss or gradients, at status_step
    "failed": "FAILED",  # an exception, in status_message
}
RUNNING = "running"

# Metric names.
SUMMARY_PREFIX = "study."  # the study run's summary: study.best_<objective>, study.trials_<status>, ...

# Artifact names.
SPEC_FILE = "spec.json"  # on the study run: the validated spec, secrets redacted
REPORT_DIR = "report"  # on the study run: the report and its plots
REPLICATION_FILE = "replication.json"  # on a replication run: its configurations (and where each came from), seeds
