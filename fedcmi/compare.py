"""The fair comparison: which method, at which learning rate, on *your* data.

Every method gets the same protocol:

1. **The learning rate is chosen on the validation split.** Each method trains at every lr of the grid with
   the selection seeds; the lr with the best mean validation headline wins (ties: the smaller lr). A winner
   at an edge of the grid grows the grid past that edge (halving or doubling), up to ``max_extensions``
   times. The test split chooses nothing.
2. **Every seed at the chosen lr**, and the same budget for every method (the params file's rounds, local
   epochs, batch size, clients per round): only the method and its lr differ.
3. **Paired differences** to the baseline on the same seed (the same partition and client sampling): the
   mean, a 95% t confidence interval and how many seeds are ahead.

Trials run in parallel processes (one torch thread each) and are cached one file per trial under the work
folder, so a rerun (after a crash or ``kill -9``) skips every finished trial. With tracking on, the
comparison is one MLflow parent run and each trial a child run; the report (Markdown and a self-contained
HTML page with its plots) is the parent's artifact and a file. Trials train through a :class:`TrialRunner`:
processes here by default; ``fedcmi_pipelines.compare`` runs each as a federation of Kubeflow pipeline runs.
Nothing here knows of KFP or DVC.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedcmi.config import Config, apply_overrides, config_from_dict
from fedcmi.errors import CommandError
from fedcmi.io import read_json, write_json

if TYPE_CHECKING:
    from fedcmi.round.record import RoundRecord

#: the methods compared when none are named: every registered algorithm at its own defaults, but the
#: single-modality baseline, which needs a modality chosen
SKIPPED_BY_DEFAULT = ("unimodal",)


@dataclass(frozen=True)
class Method:
    """A method as the comparison runs it: a name for the tables and the settings that make it."""

    name: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Method:
        """``NAME`` (an algorithm at its defaults) or ``LABEL:key=value,key=value``."""
        label, sep, rest = text.partition(":")
        if not sep:
            return cls(label, (f"algorithm.name={label}",))
        sets = tuple(s.strip() for s in rest.split(",") if s.strip())
        if not sets or not all("=" in s for s in sets):
            raise CommandError(f"--method {text!r}: give NAME or LABEL:key=value[,key=value...]")
        return cls(label, sets)


@dataclass(frozen=True)
class Trial:
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}|lr={self.lr:g}|seed={self.seed}"

    @property
    def file_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-._=" else "_" for c in self.key.replace("|", "__"))
        return safe + ".json"


@dataclass
class Plan:
    """What to compare and how."""

    methods: list[Method]
    baseline: str
    lrs: list[float]
    seeds: list[int]
    select_seeds: list[int]
    max_extensions: int = 3
    jobs: int = 1
    metric: str = "mm_acc"
    extra: list[str] = field(default_factory=list)

    def check(self) -> None:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise CommandError(f"method names must differ: {names}")
        if self.baseline not in names:
            raise CommandError(f"--baseline {self.baseline!r} is not among the methods {names}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise CommandError(f"--lrs must be positive learning rates, got {self.lrs}")
        if not self.select_seeds or not set(self.select_seeds) <= set(self.seeds):
            raise CommandError(f"--select-seeds {self.select_seeds} must be among --seeds {self.seeds}")
        if len(self.seeds) < 2:
            raise CommandError("give at least two --seeds: a paired difference needs a spread")


def default_methods() -> list[Method]:
    from fedcmi.registry import ALGORITHMS

    return [Method.parse(n) for n in sorted(ALGORITHMS.names()) if n not in SKIPPED_BY_DEFAULT]


# -- one trial ----------------------------------------------------------------------------------------------
def trial_overrides(cfg: Config, trial: Trial, work: Path) -> list[str]:
    """The settings a trial adds to the params file: its seed and lr, its own partition and outputs, no
    tracking of its own (the comparison logs it), and per-seed data when the data is generated from the seed."""
    out = [f"seed={trial.seed}", f"optim.lr={trial.lr!r}", f"partition.file={work}/partition_seed{trial.seed}.json",
           f"output.dir={work}/out/{trial.file_name[:-5]}", "tracking.enabled=false"]
    if cfg.data.name == "synthetic":
        out.append(f"data.prepared_dir={work}/prepared_seed{trial.seed}")
    return out


def trial_config(params: dict, method: Method, trial: Trial, work: Path, extra: Sequence[str]) -> Config:
    base = config_from_dict(apply_overrides(params, [*extra, *method.overrides]))
    return config_from_dict(apply_overrides(params, [*extra, *method.overrides, *trial_overrides(base, trial, work)]))


def prepare_seed(params: dict, seed: int, work: Path, extra: Sequence[str]) -> None:
    """A seed's data (generated data only) and partition, made once before trials start."""
    from fedcmi.data import DataModule, prepare
    from fedcmi.partition import make_partition, save_partition

    cfg = trial_config(params, Method("data", ()), Trial("data", 1.0, seed), work, extra)
    if not (Path(cfg.data.prepared_dir) / "meta.json").is_file():
        prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    if dm.val is None:
        raise CommandError("fedcmi compare chooses each method's learning rate on the validation split, and the "
                           f"prepared data {cfg.data.prepared_dir} has none: give val.npz (npz), set "
                           f"data.{cfg.data.name}.val_fraction, or data.synthetic.num_val")
    if not Path(cfg.partition.file).is_file():
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes,
                                      dm.train.groups), cfg.partition.file)


#: what a runner gets for each trial: the params, the method, the trial, the work folder, the extra settings
Job = tuple[dict, Method, Trial, str, tuple[str, ...]]


def trial_figures(test: dict[str, Any], val: dict[str, Any], history: Sequence[RoundRecord],
                  seconds: float) -> dict:
    """A finished trial as the comparison keeps it: the final model's test and validation figures (flat), the
    per-round curve and, under a latency model, each round's participation and simulated time."""
    out = {"test": test, "val": val, "seconds": seconds,
           "curve": [{"round": r.round, **r.evaluation.curves()} for r in history if r.evaluation is not None]}
    if any(r.timing.simulated is not None for r in history):
        out["participation"] = [{"round": r.round, "sampled": r.participation.sampled,
                                 "accepted": r.participation.accepted, "late": sorted(r.participation.late),
                                 "simulated_seconds": r.timing.simulated} for r in history]
    return out


def diverged_figures(reason: str, num_classes: int, metric: str, seconds: float) -> dict:
    """A trial the divergence guard stopped: a result too, chance level at its lr."""
    chance = 1 / num_classes
    return {"diverged": reason, "seconds": seconds, "curve": [],
            "val": {"mm_acc": chance, metric: chance}, "test": {"mm_acc": chance, metric: chance}}


def run_trial(job: Job) -> tuple[Trial, dict]:
    """Train one trial in this process and evaluate it on validation and test."""
    import torch

    from fedcmi.data import DataModule
    from fedcmi.divergence import Diverged
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition
    from fedcmi.runners.engine import train

    params, method, trial, work_s, extra = job
    torch.set_num_threads(1)  # one core per trial; results depend on the thread count, so it is pinned
    cfg = trial_config(params, method, trial, Path(work_s), extra)
    dm = DataModule(cfg.data.prepared_dir)
    t0 = time.perf_counter()
    try:
        res = train(cfg, cfg.output.dir, resume="never", progress=False)
    except Diverged as exc:
        return trial, diverged_figures(str(exc), dm.spec.num_classes, cfg.tracking.headline_metric,
                                       time.perf_counter() - t0)
    fed = Federation(cfg, dm, load_partition(cfg.partition.file))
    val = fed.evaluate(res.state, split="val")
    return trial, trial_figures(res.final.flat(), val.flat(), res.history, time.perf_counter() - t0)


class TrialRunner(Protocol):
    """Where a comparison's trials train: :class:`LocalTrials` (processes here), or pipeline runs
    (``fedcmi_pipelines.compare``). Results may come in any order."""

    jobs: int

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict]]:
        """Train every job; yield each trial with its :func:`trial_figures` as it finishes."""
        ...


class LocalTrials:
    """Trials in parallel processes on this machine, one torch thread each."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict]]:
        if not jobs:
            return
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(jobs))) as pool:
            futures = [pool.submit(run_trial, job) for job in jobs]
            for future in as_completed(futures):
                yield future.result()


# -- the protocol -------------------------------------------------------------------------------------------
def select_lr(scores: dict[float, float]) -> float:
    """The lr with the best score (ties: the smaller lr)."""
    return max(sorted(scores), key=lambda lr: scores[lr])


def next_lr(grid: Sequence[float], best: float) -> float | None:
    """The lr past the edge the best one sits on, or None when it is inside the grid."""
    grid = sorted(grid)
    if best == grid[0]:
        return round(best / 2, 10)
    if best == grid[-1]:
        return round(best * 2, 10)
    return None


def val_scores(results: dict[str, dict], method: str, grid: Sequence[float], seeds: Sequence[int],
               metric: str) -> dict[float, float]:
    """Per lr of ``grid``, the method's mean validation ``metric`` over ``seeds``: what chooses its lr."""
    return {lr: statistics.mean(results[Trial(method, lr, s).key]["val"][metric] for s in seeds) for lr in grid}


def paired(diffs: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and 95% t confidence interval of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "low": mean - half, "high": mean + half, "ahead": sum(d > 0 for d in diffs),
            "n": n}


@dataclass
class Outcome:
    """What a comparison found: every trial's result, each method's grid and chosen lr, the summary."""

    plan: Plan
    results: dict[str, dict]
    grids: dict[str, list[float]]
    chosen: dict[str, float]
    out_of_extensions: list[str]
    wall_seconds: float

    def result(self, method: str, lr: float, seed: int) -> dict:
        return self.results[Trial(method, lr, seed).key]

    def val_scores(self, method: str) -> dict[float, float]:
        return val_scores(self.results, method, self.grids[method], self.plan.select_seeds, self.plan.metric)

    def finals(self, method: str) -> list[dict]:
        return [self.result(method, self.chosen[method], s)["test"] for s in self.plan.seeds]

    def versus_baseline(self, method: str) -> dict[str, float] | None:
        if method == self.plan.baseline:
            return None
        m = self.plan.metric
        base = [f[m] for f in self.finals(self.plan.baseline)]
        return paired([f[m] - b for f, b in zip(self.finals(method), base, strict=True)])


Progress = Callable[[str], None]


def compare(params: dict, plan: Plan, work: Path, progress: Progress = print,
            on_trial: Callable[[Trial, dict], None] | None = None, runner: TrialRunner | None = None) -> Outcome:
    """Run the protocol; every finished trial goes to ``on_trial`` (the MLflow child runs) as it lands.

    Trials train through ``runner`` (default: :class:`LocalTrials` with ``plan.jobs``). Each finished
    trial is written to ``<work>/trials/`` by this process alone, so a rerun takes it from there."""
    plan.check()
    work = Path(work)
    runner = runner or LocalTrials(plan.jobs)
    methods = {m.name: m for m in plan.methods}
    for seed in plan.seeds:  # before any trial: no two trials prepare the same folder
        prepare_seed(params, seed, work, plan.extra)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    grids = {name: sorted(plan.lrs) for name in methods}
    chosen: dict[str, float] = {}

    def wave(trials: list[Trial]) -> None:
        todo = [t for t in trials if t.key not in results]
        cached = [t for t in todo if (work / "trials" / t.file_name).is_file()]
        progress(f"{len(todo)} trials ({len(cached)} already done), {runner.jobs} at a time")
        done = 0

        def land(trial: Trial, res: dict) -> None:
            nonlocal done
            done += 1
            results[trial.key] = res
            if on_trial is not None:
                on_trial(trial, res)
            state = ("DIVERGED" if "diverged" in res else
                     f"val {res['val'][plan.metric]:.3f} test {res['test'][plan.metric]:.3f}")
            progress(f"[{done}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {trial.key:40s} {state} "
                     f"({res['seconds']:.1f}s)")

        for t in cached:
            land(t, read_json(work / "trials" / t.file_name, expect=dict))
        fresh = [(params, methods[t.method], t, str(work), tuple(plan.extra)) for t in todo if t not in cached]
        for trial, res in runner.run(fresh):
            write_json(work / "trials" / trial.file_name, res)
            land(trial, res)

    pending = set(methods)
    for extension in range(plan.max_extensions + 1):
        wave([Trial(n, lr, s) for n in sorted(pending) for lr in grids[n] for s in plan.select_seeds])
        grown = set()
        for n in sorted(pending):
            chosen[n] = select_lr(val_scores(results, n, grids[n], plan.select_seeds, plan.metric))
            nxt = next_lr(grids[n], chosen[n])
            if nxt is not None and extension < plan.max_extensions:
                grids[n] = sorted([*grids[n], nxt])
                grown.add(n)
        pending = grown
        if not pending:
            break
    wave([Trial(n, chosen[n], s) for n in methods for s in plan.seeds])
    edge = [n for n in methods if next_lr(grids[n], chosen[n]) is not None]
    return Outcome(plan, results, grids, chosen, edge, time.perf_counter() - t0)


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def summary(outcome: Outcome) -> dict[str, Any]:
    """The comparison as JSON: the plan, each method's grid, validation scores, chosen lr, test figures per
    seed and paired difference."""
    p = outcome.plan
    return {
        "metric": p.metric, "baseline": p.baseline, "seeds": p.seeds, "select_seeds": p.select_seeds,
        "start_lrs": p.lrs, "extra": p.extra, "wall_seconds": round(outcome.wall_seconds, 1),
        "trials": len(outcome.results),
        "trial_seconds": round(sum(r["seconds"] for r in outcome.results.values()), 1),
        "methods": {m.name: {"overrides": list(m.overrides), "grid": outcome.grids[m.name],
                             "chosen_lr": outcome.chosen[m.name],
                             "val_scores": {f"{lr:g}": v for lr, v in outcome.val_scores(m.name).items()},
                             "test": outcome.finals(m.name), "vs_baseline": outcome.versus_baseline(m.name),
                             "edge": m.name in outcome.out_of_extensions}
                    for m in p.methods},
    }
