"""The federated pipeline: a bounded number of rounds per run, chained through the federation's store.

A run of this pipeline continues the federation kept in its store (the engine's
checkpoint folder on the data volume) for at most ``rounds_per_run`` rounds:

    begin ─ round 1: train_clients × workers ─ conclude ─ round 2: ... ─ finish
      └─ exit handler: close_run (ends the MLflow run FAILED when the run fails)

The number of rounds a spec holds is fixed at compile time, so its size does not
grow with ``federation.rounds``; :mod:`fedcmi_pipelines.driver` submits runs until the
federation is complete, and a run that fails or is lost is resubmitted without
losing or repeating a round (each round is committed to the store atomically).
The training settings users compare (seed, algorithm, lr, mu, rounds,
local_epochs) are run-time parameters; clients are drawn at run time by
:class:`fedcmi.round.schedule.Schedule`, exactly as the engine draws them.
"""


import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Input, Model

from fedcmi import __version__
from fedcmi.config import Config
from fedcmi.errors import REFUSED
from fedcmi.round.schedule import Schedule
from fedcmi_components import make_components
from fedcmi_pipelines.driver import SUCCEEDED, Outcome

DEFAULT_IMAGE = f"fedcmi:{__version__}"


@dataclass
class PipelineOptions:
    """Where and how the components run; not part of the training config."""

    image: str = DEFAULT_IMAGE
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1  # per training pod; 0: no accelerator request (CPU clusters, local runs)
    cpu: str = "4"  # request and limit of a training pod
    memory: str = "16G"
    retries: int = 2  # of a pod that fails (eviction, OOM kill, node loss), with exponential backoff
    parallelism: int = 0  # training pods at once in a round; 0: all of them
    pvc: str = ""  # a PersistentVolumeClaim holding the project root (DVC outputs), mounted at data_root
    data_root: str = "/data"
    rounds_per_run: int = 10
    clients_per_pod: int = 1

    def slots(self, cfg: Config) -> int:
        """Round slots in one run: ``rounds_per_run``, or fewer when the federation is shorter."""
        return min(self.rounds_per_run, cfg.federation.rounds)


# what the light steps ask for: no accelerator, little memory
LIGHT_CPU, LIGHT_MEMORY = "1", "4G"


def build_pipeline(cfg: Config, opts: PipelineOptions):
    """The pipeline function for ``cfg``: ``opts.slots(cfg)`` rounds of ``clients_per_round`` clients."""
    comp = make_components(opts.image)
    params_json = json.dumps(cfg.to_dict(), sort_keys=True)
    slots = opts.slots(cfg)
    workers = list(range(Schedule(cfg).workers(opts.clients_per_pod)))
    parallelism = opts.parallelism or len(workers)

    def volume(task):
        if opts.pvc:
            from kfp import kubernetes

            kubernetes.mount_pvc(task, pvc_name=opts.pvc, mount_path=opts.data_root)
        return task

    def step(task, name: str, retry: bool = True):
        """Every step: named, never cached (each writes to the store or to MLflow), on the data volume,
        retried with backoff where repeating it is safe."""
        task.set_display_name(name).set_caching_options(False)
        if retry and opts.retries:
            task.set_retry(opts.retries, backoff_duration="30s", backoff_factor=2.0)
        return volume(task)

    def light(task, name: str, retry: bool = True):
        task.set_cpu_request(LIGHT_CPU).set_memory_request(LIGHT_MEMORY).set_memory_limit(opts.memory)
        return step(task, name, retry)

    @dsl.pipeline(name="fedcmi-round", description="One round: training pods in parallel, then conclude.")
    def fl_round(config_json: str, data_root: str, store: str, global_model: Input[Model], committed: int,
                 offset: int, tracking_uri: str) -> Model:
        with dsl.ParallelFor(items=workers, parallelism=parallelism, name="workers") as w:
            t = comp.train_clients(config_json=config_json, data_root=data_root, global_model=global_model,
                                   committed=committed, offset=offset, worker=w,
                                   per_worker=opts.clients_per_pod)
            t.set_cpu_request(opts.cpu).set_cpu_limit(opts.cpu)
            t.set_memory_request(opts.memory).set_memory_limit(opts.memory)
            if opts.accelerator_count > 0:
                t.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(opts.accelerator_count)
            step(t, "train")
        c = light(comp.conclude_round(config_json=config_json, data_root=data_root, store=store,
                                      global_model=global_model, updates=dsl.Collected(t.outputs["updates"]),
                                      committed=committed, offset=offset, tracking_uri=tracking_uri),
                  "conclude")
        return c.outputs["new_global"]

    @dsl.pipeline(
        name=f"fedcmi-{cfg.algorithm.name}",
        description=f"Up to {slots} rounds of a federation per run, {cfg.federation.clients_per_round} of "
                    f"{cfg.partition.num_clients} clients per round, continued from the federation's store.")
    def fedcmi_pipeline(
        seed: int = cfg.seed,
        algorithm: str = cfg.algorithm.name,
        lr: float = cfg.optim.lr,
        mu: float = cfg.algorithm.mu,
        rounds: int = cfg.federation.rounds,
        local_epochs: int = cfg.federation.local_epochs,
        data_root: str = opts.data_root,
        store: str = "",
        tracking_uri: str = "",
        run_name: str = f"{cfg.algorithm.name}-seed{cfg.seed}",
        expect_committed: int = 0,
    ):
        close = light(comp.close_run(data_root=data_root, store=store, run_name=run_name), "close-run",
                      retry=False)
        with dsl.ExitHandler(close, name="federation"):
            begin = light(comp.begin_run(params_json=params_json, seed=seed, algorithm=algorithm, lr=lr, mu=mu,
                                         rounds=rounds, local_epochs=local_epochs, data_root=data_root,
                                         store=store, tracking_uri=tracking_uri, run_name=run_name,
                                         expect_committed=expect_committed), "begin")
            conf, where = begin.outputs["config_json"], begin.outputs["store"]
            committed = begin.outputs["committed"]
            model = begin.outputs["global_model"]
            for k in range(slots):
                rnd = fl_round(config_json=conf, data_root=data_root, store=where, global_model=model,
                               committed=committed, offset=k, tracking_uri=tracking_uri)
                rnd.set_display_name(f"round-{k + 1}").set_caching_options(False)
                model = rnd.output
            light(comp.finish_run(config_json=conf, data_root=data_root, store=where, global_model=model,
                                  tracking_uri=tracking_uri), "finish")

    return fedcmi_pipeline


def compile_pipeline(cfg: Config, opts: PipelineOptions, out: str | Path) -> Path:
    """Write the pipeline YAML atomically; returns its path."""
    from fedcmi.io import write_text

    out = Path(out)
    tmp = out.with_name(f".compiling-{out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        compiler.Compiler().compile(build_pipeline(cfg, opts), str(tmp))
        write_text(out, tmp.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    return out


def spec_figures(path: str | Path) -> dict:
    """Bytes, DAG tasks and executors of a compiled spec (what a cluster must store and schedule)."""
    import yaml

    text = Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    spec = docs[0]
    tasks = sum(len(c.get("dag", {}).get("tasks", {})) for c in spec.get("components", {}).values())
    tasks += len(spec.get("root", {}).get("dag", {}).get("tasks", {}))
    return {"bytes": len(text.encode()), "dag_tasks": tasks,
            "executors": len(spec.get("deploymentSpec", {}).get("executors", {}))}


PROGRESS = "[fedcmi] "  # components prefix the lines meant for the person watching a local run


@contextmanager
def _quiet(log_file: Path, echo: Callable[[str], str]):
    """Send everything written to stdout and stderr (kfp.local's executor inputs, task logs, child
    processes) to ``log_file``; write the progress lines, formatted by ``echo``, to the real stderr."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    done = threading.Event()

    def follow() -> None:
        with open(log_file, "rb") as src:
            src.seek(0, os.SEEK_END)
            while True:
                line = src.readline()
                if line.endswith(b"\n"):
                    text = line.decode(errors="replace")
                    if PROGRESS in text:
                        os.write(saved[1], (echo(text.split(PROGRESS, 1)[1].rstrip()) + "\n").encode())
                    continue
                if done.is_set():
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        done.set()  # the follower drains what is left, writing to saved[1]: close it only after the join
        thread.join(timeout=10)
        os.close(saved[0])
        os.close(saved[1])


def local_runner(kind: str, data_root: Path, environment: dict | None = None):
    """kfp.local's runner: ``subprocess`` (this environment) or ``docker`` (the image; the data root is
    bind-mounted at the same path, the steps run as this user and reach loopback servers)."""
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind != "docker":
        raise ValueError(f"runner must be 'subprocess' or 'docker', not {kind!r}")
    from docker.types import Mount

    bind = Mount(target=str(data_root), source=str(data_root), type="bind")
    return local.DockerRunner(mounts=[bind], user=f"{os.getuid()}:{os.getgid()}", network_mode="host",
                              environment={"HOME": "/tmp", **(environment or {})})


def run_local(cfg: Config, opts: PipelineOptions, arguments: dict, pipeline_root: Path, runner,
              log_file: Path, echo: Callable[[str], str] = lambda line: line) -> Outcome:
    """One run of the pipeline with kfp.local, and how it ended. Its full log goes to ``log_file``; a step's
    refusal that would repeat (its :data:`~fedcmi.errors.REFUSED` line) is the cause of a permanent failure."""
    from kfp import local

    pipeline = build_pipeline(cfg, opts)
    local.init(runner=runner, pipeline_root=str(Path(pipeline_root).resolve()), raise_on_error=True)
    import builtins

    start = log_file.stat().st_size if log_file.is_file() else 0
    real_print = builtins.print  # kfp.local swaps in an indenting print and may not put it back
    with _quiet(log_file, echo):
        try:
            pipeline(**arguments)
        except Exception as exc:  # kfp.local reports a failed task as a RuntimeError naming it
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0]) if str(exc) else ""
            print(f"{PROGRESS}run failed: {first or exc.__class__.__name__}; see {log_file}", flush=True)
            failed = first or exc.__class__.__name__
        else:
            failed = ""
        finally:
            builtins.print = real_print
    if not failed:
        return Outcome(SUCCEEDED)
    with open(log_file, "rb") as fh:
        fh.seek(start)
        refused = [line.split(REFUSED, 1)[1].strip() for line in fh.read().decode(errors="replace").splitlines()
                   if REFUSED in line]
    if refused:
        return Outcome("FAILED", refused[-1], permanent=True)
    return Outcome("FAILED", failed)


def federation_arguments(cfg: Config, data_root: str, store: str, tracking_uri: str, run_name: str) -> dict:
    """The run-time parameters of every run of ``cfg``'s federation."""
    return {"seed": cfg.seed, "algorithm": cfg.algorithm.name, "lr": cfg.optim.lr, "mu": cfg.algorithm.mu,
            "rounds": cfg.federation.rounds, "local_epochs": cfg.federation.local_epochs,
            "data_root": data_root, "store": store, "tracking_uri": tracking_uri,
            "run_name": run_name or f"{cfg.algorithm.name}-seed{cfg.seed}"}


def local_executor(cfg: Config, opts: PipelineOptions, root: Path, store: str, run_name: str, runner,
                   pipeline_root: Path, say: Callable[[str], None], label: str = "kfp.local"):
    """A driver executor that runs ``cfg``'s federation run after run with kfp.local (full logs under
    ``pipeline_root/logs``) and reads its store on this machine."""
    from fedcmi.runners.store import resolve_store, status
    from fedcmi_pipelines.driver import LocalExecutor

    count = [0]

    def one_run(arguments: dict) -> Outcome:
        count[0] += 1
        log_file = Path(pipeline_root) / "logs" / f"{arguments['run_name']}-{count[0]}.log"
        say(f"{label}; full log in {log_file}")
        return run_local(cfg, opts, arguments, pipeline_root, runner, log_file, echo=lambda line: f"fedcmi: {line}")

    def committed() -> int:  # the store lies on this machine: the driver checks it against its record
        where = resolve_store(store, run_name, root)
        return int(status(cfg, where)["completed_rounds"]) if where.is_dir() else 0

    return LocalExecutor(one_run, committed)
