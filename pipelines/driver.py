"""Drive a long federation as a chain of bounded pipeline runs, and survive the driver's own restart.

Each run of the pipeline continues the federation from its store for up to
``rounds_per_run`` rounds, so ``ceil(rounds / rounds_per_run)`` successful runs
complete any federation, whatever failed in between (a failed run loses at most
its uncommitted round, and the next run starts after the last committed one).

The driver keeps its own state file (the federation's arguments and every run it
submitted, written atomically before it waits), so a driver that is killed and
started again waits for the run it had in flight instead of submitting a second
one that would write the same store at the same time.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedcmi.errors import FedcmiError
from fedcmi.io import read_json, write_json

FORMAT = "fedcmi-drive/1"
SUCCEEDED = "SUCCEEDED"
IN_FLIGHT = "SUBMITTED"


class DriveError(FedcmiError, RuntimeError):
    """A federation the driver cannot go on with; the message says why and what to do."""


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its final state, the cause of a failure where the executor can tell it, and whether
    a resubmitted run would meet the same cause (a refusal: a foreign store, a bad setting)."""

    state: str
    cause: str = ""
    permanent: bool = False


class Executor(Protocol):
    """Where pipeline runs go: a Kubeflow Pipelines server, or kfp.local on this machine."""

    def submit(self, arguments: dict, run_name: str) -> str:
        """Start a run; returns its id."""

    def wait(self, run_id: str) -> Outcome:
        """Block until the run ends; returns how it ended."""

    def committed(self) -> int | None:
        """Rounds committed in the federation's store, where the driver can see the store; else None."""


@dataclass
class Plan:
    """One federation's chain: the run-time arguments every run gets and how many successful runs it takes."""

    arguments: dict
    rounds: int
    rounds_per_run: int

    @property
    def runs_needed(self) -> int:
        return math.ceil(self.rounds / self.rounds_per_run)

    def committed_by(self, successes: int) -> int:
        """The rounds ``successes`` successful runs have committed at least."""
        return min(self.rounds, successes * self.rounds_per_run)


def _damaged(state_file: Path, what: str) -> DriveError:
    return DriveError(f"{state_file} is a damaged driver state ({what}); the committed rounds are in the "
                      "federation's store, not in this file: delete it and run the driver again to go on")


def load_drive_state(state_file: Path, plan: Plan) -> dict[str, Any] | None:
    """The driver state kept in ``state_file`` for ``plan``'s federation, checked field by field; None when
    there is none yet."""
    if not state_file.is_file():
        return None
    old = read_json(state_file)
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise DriveError(f"{state_file} is not a fedcmi driver state; give another --state")
    if not isinstance(old.get("arguments"), dict):
        raise _damaged(state_file, "no `arguments` object")
    if not isinstance(old.get("rounds_per_run"), int) or isinstance(old["rounds_per_run"], bool):
        raise _damaged(state_file, "no whole `rounds_per_run`")
    runs = old.get("runs")
    if not isinstance(runs, list):
        raise _damaged(state_file, f"`runs` is {type(runs).__name__ if runs is not None else 'missing'}, "
                                   "not a list of runs")
    for i, run in enumerate(runs, 1):
        if not isinstance(run, dict) or not isinstance(run.get("run_id"), str) \
                or not isinstance(run.get("state"), str):
            raise _damaged(state_file, f"run {i} lacks a `run_id` or a `state`")
    if (old["arguments"], old["rounds_per_run"]) != (plan.arguments, plan.rounds_per_run):
        raise DriveError(f"{state_file} drives another federation (other arguments); give this one a --state "
                         "of its own, or delete the file to start over")
    return old


def drive(executor: Executor, plan: Plan, state_file: Path, max_failures: int = 3,
          progress: Callable[[str], None] = print) -> dict:
    """Submit runs until ``plan.runs_needed`` have succeeded; returns the state (also kept in ``state_file``).

    Stops with :class:`DriveError` after ``max_failures`` failed runs in a row (a fault that every run meets,
    a diverged model, is reported, not retried for ever), at once on a refusal that a resubmitted run would
    meet again, naming its cause, and at once when the store is behind what the earlier runs committed.
    """
    state_file = Path(state_file)
    state: dict[str, Any] = load_drive_state(state_file, plan) or {
        "format": FORMAT, "arguments": plan.arguments, "rounds": plan.rounds,
        "rounds_per_run": plan.rounds_per_run, "runs": []}
    runs: list[dict] = state["runs"]

    def save() -> None:
        write_json(state_file, state)

    def succeeded() -> int:
        return sum(r["state"] == SUCCEEDED for r in runs)

    def failed_in_a_row() -> int:
        n = 0
        for r in reversed(runs):
            if r["state"] == SUCCEEDED:
                break
            n += 1
        return n

    def ended(run: dict, outcome: Outcome) -> None:
        run["state"] = outcome.state
        run["ended"] = time.time()
        if outcome.cause:
            run["cause"] = outcome.cause
        save()
        if outcome.permanent:
            raise DriveError(f"run {run['run_id']} was refused: {outcome.cause}. A resubmitted run would meet "
                             "the same refusal; fix its cause and run the driver again (committed rounds are kept)")

    if runs and runs[-1]["state"] == IN_FLIGHT:  # the driver was stopped while this run went on
        progress(f"waiting for run {runs[-1]['run_id']}, submitted before the driver restarted")
        ended(runs[-1], executor.wait(runs[-1]["run_id"]))
    seen, expected = executor.committed(), plan.committed_by(succeeded())
    if seen is not None and seen < expected:
        raise DriveError(f"the federation's store holds {seen} committed rounds, behind the {expected} that the "
                         f"{succeeded()} successful runs in {state_file} committed: it was removed or replaced "
                         "since. Give the federation's own store, or delete the state file to start over")
    if seen is None and succeeded() >= plan.runs_needed and runs:
        progress(f"{state_file} records the federation as complete ({succeeded()} successful runs); the driver "
                 "cannot see the store from here, so check it holds every round (delete the file to run again)")
    name = str(plan.arguments.get("run_name", "federation"))
    while succeeded() < plan.runs_needed:
        if failed_in_a_row() >= max_failures:
            cause = runs[-1].get("cause") or "see its logs"
            raise DriveError(f"{max_failures} runs in a row failed (last: {runs[-1]['run_id']}: {cause}). "
                             f"Committed rounds are kept: run the driver again to go on")
        k = len(runs) + 1
        run_id = executor.submit(dict(plan.arguments, expect_committed=plan.committed_by(succeeded())),
                                 f"{name}-run{k}")
        runs.append({"run_id": run_id, "state": IN_FLIGHT, "submitted": time.time()})
        save()  # before waiting: a restarted driver must find the run it has in flight
        progress(f"run {k} ({run_id}): submitted; {succeeded()} of {plan.runs_needed} runs done")
        ended(runs[-1], executor.wait(run_id))
        progress(f"run {k} ({run_id}): {runs[-1]['state']}")
    return state


class KfpExecutor:
    """Runs on a Kubeflow Pipelines server, from one compiled package."""

    def __init__(self, client, package: Path, experiment: str, poll_seconds: float = 30.0,
                 progress: Callable[[str], None] = print, committed: Callable[[], int] | None = None) -> None:
        self.client = client
        self._committed = committed
        self.package = package
        self.experiment = experiment
        self.poll = poll_seconds
        self.progress = progress

    def submit(self, arguments: dict, run_name: str) -> str:
        try:
            run = self.client.create_run_from_pipeline_package(str(self.package), arguments=arguments,
                                                               run_name=run_name, experiment_name=self.experiment)
        except Exception as exc:  # kfp raises urllib3 / ApiException / ValueError variants for the same fault
            raise DriveError(f"could not submit to Kubeflow Pipelines: {first_line(exc)}") from None
        return str(run.run_id)

    def committed(self) -> int | None:
        # the store lies on the cluster's data volume: in sight only of a driver that mounts it
        return self._committed() if self._committed is not None else None

    def wait(self, run_id: str, attempts: int = 10) -> Outcome:
        last, failures = None, 0
        while True:
            try:
                run = self.client.get_run(run_id)
                state = str(run.state)
                failures = 0
            except Exception as exc:  # the API away for a while must not end a days-long federation
                failures += 1
                if failures >= attempts:
                    raise DriveError(f"lost contact with Kubeflow Pipelines while run {run_id} was in flight "
                                     f"({first_line(exc)}); run the driver again to go on waiting") from None
                time.sleep(self.poll)
                continue
            if state != last:
                self.progress(f"run {run_id}: {state}")
                last = state
            if state in ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"):
                return Outcome(state, "" if state == SUCCEEDED else _run_error(run))
            time.sleep(self.poll)


def _run_error(run: Any) -> str:
    """The first line of a finished Kubeflow run's error status, where the API gives one."""
    message = getattr(getattr(run, "error", None), "message", None)
    return str(message).splitlines()[0][:300] if message else ""


def first_line(exc: Exception) -> str:
    """An exception as one line: its class and the first line of its message."""
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"


class LocalExecutor:
    """Runs with kfp.local on this machine: :meth:`wait` runs the submitted run to its end. ``run`` returns
    the run's :class:`Outcome` (or whether it succeeded); ``committed``, where given, reads the store."""

    def __init__(self, run: Callable[[dict], Outcome | bool],
                 committed: Callable[[], int] | None = None) -> None:
        self._run = run
        self._committed = committed
        self._submitted: dict[str, dict] = {}

    def submit(self, arguments: dict, run_name: str) -> str:
        run_id = f"local-{uuid.uuid4().hex[:12]}"
        self._submitted[run_id] = arguments
        return run_id

    def wait(self, run_id: str) -> Outcome:
        if run_id not in self._submitted:  # submitted by a driver process that is gone: it died with it
            return Outcome("LOST")
        result = self._run(self._submitted.pop(run_id))
        if isinstance(result, Outcome):
            return result
        return Outcome(SUCCEEDED if result else "FAILED")

    def committed(self) -> int | None:
        return self._committed() if self._committed is not None else None
