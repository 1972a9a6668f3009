"""``fedcmi pipeline compare``: the fair comparison with every trial a federation of pipeline runs.

The protocol (:mod:`fedcmi.compare`: the lr chosen on validation, every seed at it, paired differences,
the report and the MLflow parent run) runs in this process; each trial is the federated pipeline driven
to its last round by :func:`~fedcmi_pipelines.driver.drive` (with kfp.local here, or on a Kubeflow
Pipelines server), with its own store under ``<work>/stores/``. The pipeline's finish step evaluates the
final model on the test and validation splits into that store, where this process reads the trial's
figures; so it runs where the data volume is mounted (here, or in a pod mounting the claim at
``--data-root``). A rerun resumes every unfinished trial from its store, as the driver resumes any
federation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from fedcmi.compare import Job, Trial, diverged_figures, trial_config, trial_figures
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.io import read_json
from fedcmi.runners.store import DIVERGED, final_figures
from fedcmi_pipelines.driver import DriveError, Executor, Plan, drive
from fedcmi_pipelines.federated import PipelineOptions, federation_arguments

#: makes the driver executor of one trial's federation: (its config, its store relative to the data root)
ExecutorFactory = Callable[[Config, str], Executor]


class PipelineTrials:
    """Trials as federations of pipeline runs; ``jobs`` of them in flight at once (one on kfp.local, whose
    runs share this process)."""

    def __init__(self, root: Path, opts: PipelineOptions, executor_for: ExecutorFactory, jobs: int = 1,
                 max_failures: int = 3, progress: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.opts = opts
        self.executor_for = executor_for
        self.jobs = jobs
        self.max_failures = max_failures
        self.progress = progress

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict]]:
        if self.jobs <= 1:
            for job in jobs:
                yield self.one(job)
            return
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:  # each thread waits on its own runs
            for future in as_completed([pool.submit(self.one, job) for job in jobs]):
                yield future.result()

    def one(self, job: Job) -> tuple[Trial, dict]:
        """Drive one trial's federation to its end and read its figures from its store."""
        params, method, trial, work, extra = job
        cfg = trial_config(params, method, trial, Path(work), extra)
        stem = trial.file_name[:-5]
        store = f"{work}/stores/{stem}"
        run_name = f"trial-{stem}"
        plan = Plan(federation_arguments(cfg, str(self.root), store, "", run_name), cfg.federation.rounds,
                    self.opts.slots(cfg))
        t0 = time.perf_counter()
        say = self.progress
        try:
            drive(self.executor_for(cfg, store), plan, self.root / work / "drive" / f"{stem}.json",
                  self.max_failures, progress=lambda line: say(f"{trial.key}: {line}"))
        except DriveError:
            marker = self.root / store / DIVERGED
            if not marker.is_file():
                raise
            return trial, diverged_figures(str(read_json(marker, expect=dict)["reason"]),
                                           DataModule(self.root / cfg.data.prepared_dir).spec.num_classes,
                                           cfg.tracking.headline_metric, time.perf_counter() - t0)
        test, val, history = final_figures(cfg, self.root / store)
        if val is None:  # the comparison checked the data for a validation split before any trial
            raise DriveError(f"the federation in {self.root / store} has no validation figures")
        return trial, trial_figures(test, val, history, time.perf_counter() - t0)
