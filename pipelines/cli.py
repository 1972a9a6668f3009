"""``fedcmi pipeline compile | submit | drive | run-local``."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from fedcmi.config import Config
from fedcmi.errors import CommandError


class PipelineError(CommandError):
    """A pipeline that cannot be compiled, submitted or driven; the message says why."""


# Kubernetes resource quantities: 500m, 4, 1.5, 16Gi, 16G, 512Mi, 1e9 ...
#: The quantities KFP accepts (what it refuses with a traceback is refused here in one line): CPU as a
#: number or whole millicores; memory as a number with an optional decimal or binary suffix.
_QUANTITIES = {"CPU": re.compile(r"^(?:([0-9]+(?:\.[0-9]+)?)|([0-9]+)(m))$"),
               "memory": re.compile(r"^([0-9]+(?:\.[0-9]+)?)(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")}


_SCALE = {"m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}
#: Largest a pod may ask for: far above any node (2**63 bytes, 2**20 CPUs), far below what breaks KFP.
_MAXIMUM = {"CPU": 2.0**20, "memory": 2.0**63}


def _quantity(what: str):
    """A positive Kubernetes quantity of ``what`` within reason (``0``, ``1e400`` are one clear line)."""
    def parse(text: str) -> str:
        m = _QUANTITIES[what].match(text.strip())
        if not m:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a Kubernetes {what} quantity (examples: "
                + ("'4', '500m', '1.5'" if what == "CPU" else "'16Gi', '16G', '512Mi'")
                + "; units are case-sensitive, with no 'B' and no exponent)")
        number, unit = (m.group(1), m.group(2) or "") if what == "memory" else \
            ((m.group(1), "") if m.group(1) is not None else (m.group(2), "m"))
        value = float(number) * _SCALE.get(unit, 1.0)
        if not 0 < value <= _MAXIMUM[what]:
            raise argparse.ArgumentTypeError(f"{text!r}: a pod's {what} must be above 0 and at most "
                                             f"{_MAXIMUM[what]:.3g}")
        return text.strip()
    return parse


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be above 0 and at most a day")
    return value


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")


def _pvc(text: str) -> str:
    """'' (none) or a PersistentVolumeClaim name (a DNS-1123 label)."""
    if text and not _DNS_LABEL.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a PersistentVolumeClaim name (lower-case letters, "
                                         "digits and '-', at most 63, starting and ending alphanumeric)")
    return text


def _image(text: str) -> str:
    if not _IMAGE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a container image reference (such as "
                                         "'registry.example/fedcmi:0.1.0')")
    return text


def _count(minimum: int, maximum: int = 100_000):
    """A whole number within [minimum, maximum]: a count of pods, retries or accelerators (the cap keeps a
    typo from reaching Kubernetes, whose counts are 32-bit)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above {maximum}")
        return value
    return parse


class _BriefParser(argparse.ArgumentParser):
    """A bad flag is one line naming it (exit 2), not the whole usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _options(args: argparse.Namespace):
    from fedcmi_pipelines.federated import PipelineOptions

    return PipelineOptions(image=args.image, accelerator_type=args.accelerator_type,
                           accelerator_count=args.accelerator_count, cpu=args.cpu, memory=args.memory,
                           retries=args.retries, parallelism=args.parallelism, pvc=args.pvc,
                           data_root=args.data_root, rounds_per_run=args.rounds_per_run,
                           clients_per_pod=args.clients_per_pod)


def _arguments(cfg: Config, args: argparse.Namespace) -> dict:
    """The run-time parameters of every run of this federation."""
    from fedcmi_pipelines.federated import federation_arguments

    return federation_arguments(cfg, args.data_root, args.store, args.tracking_uri, args.run_name or "")


def cmd_compile(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi_pipelines.federated import compile_pipeline, spec_figures

    opts = _options(args)
    out = compile_pipeline(cfg, opts, args.out)
    fig = spec_figures(out)
    from fedcmi_pipelines.driver import Plan

    runs = Plan({}, cfg.federation.rounds, opts.slots(cfg)).runs_needed
    print(f"wrote {out}: {fig['bytes']:,} bytes, {fig['dag_tasks']} DAG tasks; {opts.slots(cfg)} rounds per run, "
          f"{runs} run(s) for {cfg.federation.rounds} rounds; {cfg.federation.clients_per_round} clients per round "
          f"in pods of {opts.clients_per_pod}; image {opts.image}")
    return 0


def _client(args: argparse.Namespace):
    import kfp

    try:
        return kfp.Client(host=args.host, namespace=args.namespace)
    except Exception as exc:  # kfp raises urllib3/ApiException/ValueError variants for the same fault
        raise PipelineError(_unreachable(args.host, exc)) from None


def _unreachable(host: str, exc: Exception) -> str:
    from fedcmi_pipelines.driver import first_line

    return f"could not submit to Kubeflow Pipelines at {host}: {first_line(exc)}"


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    """One run: up to --rounds-per-run rounds from where the federation's store stands."""
    import tempfile

    from fedcmi_pipelines.federated import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, _options(args), Path(tmp) / "pipeline.yaml")
        arguments = _arguments(cfg, args)
        try:
            run = _client(args).create_run_from_pipeline_package(
                str(package), experiment_name=args.experiment or cfg.tracking.experiment,
                run_name=arguments["run_name"], arguments=arguments)
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(_unreachable(args.host, exc)) from None
    print(json.dumps({"run_id": run.run_id, "host": args.host}))
    return 0


def _plan(cfg: Config, args: argparse.Namespace):
    from fedcmi_pipelines.driver import Plan

    return Plan(_arguments(cfg, args), cfg.federation.rounds, _options(args).slots(cfg))


def _say(text: str) -> None:
    # not print(): kfp.local indents every print() while a task runs
    sys.stderr.write(f"fedcmi: {text}\n")
    sys.stderr.flush()


def cmd_drive(cfg: Config, args: argparse.Namespace) -> int:
    """Submit runs until the federation is complete; restartable (the state file keeps the run in flight)."""
    import tempfile

    from fedcmi_pipelines.driver import DriveError, KfpExecutor, drive
    from fedcmi_pipelines.federated import compile_pipeline

    plan = _plan(cfg, args)
    state_file = Path(args.state or f"outputs/drive/{plan.arguments['run_name']}.json")
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, _options(args), Path(tmp) / "pipeline.yaml")
        executor = KfpExecutor(_client(args), package, args.experiment or cfg.tracking.experiment,
                               args.poll_seconds, progress=_say)
        try:
            state = drive(executor, plan, state_file, args.max_failures, progress=_say)
        except DriveError as exc:
            raise PipelineError(str(exc)) from None
    print(json.dumps({"runs": state["runs"], "state_file": str(state_file)}))
    return 0


def cmd_run_local(cfg: Config, args: argparse.Namespace) -> int:
    """The whole federation with kfp.local, run after run, as `drive` would on a cluster."""
    from fedcmi.io import load_state, save_state
    from fedcmi.runners.store import MODEL, resolve_store, status
    from fedcmi_pipelines.driver import DriveError, drive
    from fedcmi_pipelines.federated import local_executor, local_runner

    root = Path(args.data_root).resolve()
    args.data_root = str(root)
    if args.store:  # relative to where the command runs, as every path flag; the steps run in the data root
        args.store = str(Path(args.store).resolve())
    opts = _options(args)
    plan = _plan(cfg, args)
    pipeline_root = Path(args.pipeline_root).resolve()
    env = dict(args.env)
    os.environ.update(env)  # the subprocess runner's steps inherit it; the docker runner passes it on
    runner = local_runner(args.runner, root, environment=env)
    executor = local_executor(cfg, opts, root, args.store, plan.arguments["run_name"], runner, pipeline_root, _say,
                              label=f"kfp.local ({args.runner})")
    state_file = Path(args.state or pipeline_root / f"drive-{plan.arguments['run_name']}.json")
    try:
        drive(executor, plan, state_file, args.max_failures, progress=_say)
    except DriveError as exc:
        raise PipelineError(str(exc)) from None
    store = resolve_store(args.store, plan.arguments["run_name"], root)
    info = status(cfg, store)
    if not info["complete"]:
        raise PipelineError(f"the federation in {store} stands at {info['completed_rounds']} of {info['rounds']} "
                            "rounds after the runs succeeded; see the logs")
    state, meta = load_state(store / MODEL, checked=True)
    out = save_state(args.out, state, meta)
    print(json.dumps({"model": str(out), "store": str(store), "rounds": info["rounds"]}))
    return 0


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    """The fair comparison with each trial a federation of pipeline runs (kfp.local, or --host)."""
    import tempfile

    from fedcmi.cli import run_comparison
    from fedcmi_pipelines.compare import PipelineTrials
    from fedcmi_pipelines.driver import KfpExecutor
    from fedcmi_pipelines.federated import compile_pipeline, local_executor, local_runner

    root = Path(args.data_root).resolve()
    work = Path(args.work).resolve()
    if not work.is_relative_to(root):
        from fedcmi.errors import UsageError

        raise UsageError(f"--work {args.work} lies outside --data-root {root}: the pipeline's steps read the "
                            "trials' data and write their stores there")
    if args.params:
        args.params = str(Path(args.params).resolve())
    args.work = str(work.relative_to(root))
    os.chdir(root)  # as every step: the trials' paths are relative to the project root on the data volume
    args.data_root = str(root)
    if args.host:
        opts = _options(args)
        client = _client(args)
        packages = Path(tempfile.mkdtemp(prefix="fedcmi-compare-"))

        def executor_for(trial_cfg: Config, store: str) -> KfpExecutor:
            from fedcmi.runners.store import status

            package = compile_pipeline(trial_cfg, opts, packages / f"{Path(store).name}.yaml")
            return KfpExecutor(client, package, args.experiment or cfg.tracking.experiment, args.poll_seconds,
                               progress=_say,
                               committed=lambda: int(status(trial_cfg, root / store)["completed_rounds"]))
        jobs = args.jobs or 4
    else:
        args.accelerator_count, args.retries, args.parallelism, args.pvc = 0, 0, 0, ""
        opts = _options(args)
        runner = local_runner(args.runner, root)
        pipeline_root = root / args.work / "kfp_local"

        def executor_for(trial_cfg: Config, store: str):  # type: ignore[misc]
            return local_executor(trial_cfg, opts, root, store, "", runner, pipeline_root, _say,
                                  label=f"kfp.local ({args.runner})")
        jobs = 1  # kfp.local runs one pipeline at a time in this process
    trials = PipelineTrials(root, opts, executor_for, jobs=jobs, max_failures=args.max_failures, progress=_say)
    return run_comparison(cfg, args, runner=trials)


def add_commands(sub, common) -> None:
    from fedcmi_pipelines.federated import DEFAULT_IMAGE

    p = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, submit, drive, or run locally.",
                       description="Kubeflow Pipelines built from params.yaml. A run continues the federation's "
                                   "store for up to --rounds-per-run rounds; `drive` chains runs to the end.")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION", parser_class=_BriefParser)

    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--rounds-per-run", type=_count(1), default=10,
                       help="round slots in one run (the spec's size grows with this, not with the rounds)")
    shape.add_argument("--clients-per-pod", type=_count(1), default=1,
                       help="clients one training pod trains in turn (fewer pods, less start-up)")
    shape.add_argument("--data-root", default="/data",
                       help="the project root on the data volume: holds data.prepared_dir and partition.file")
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--image", type=_image, default=DEFAULT_IMAGE,
                         help="the component image (default: %(default)s)")
    cluster.add_argument("--accelerator-type", default="nvidia.com/gpu", help="accelerator of a training pod")
    cluster.add_argument("--accelerator-count", type=_count(0), default=1,
                         help="accelerators per training pod (0: none)")
    cluster.add_argument("--cpu", type=_quantity("CPU"), default="4", help="CPU request and limit of a training pod")
    cluster.add_argument("--memory", type=_quantity("memory"), default="16Gi",
                         help="memory request and limit of a training pod")
    cluster.add_argument("--retries", type=_count(0), default=2,
                         help="retries of a failed pod, with exponential backoff from 30 s")
    cluster.add_argument("--parallelism", type=_count(0), default=0,
                         help="training pods at once in a round (0: all of a round)")
    cluster.add_argument("--pvc", type=_pvc, default="",
                         help="PersistentVolumeClaim holding the project root, mounted at --data-root on every "
                         "step (kfp-kubernetes)")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--host", required=True, help="the Kubeflow Pipelines API endpoint")
    server.add_argument("--namespace", default=None, help="the Kubeflow namespace")
    server.add_argument("--experiment", help="KFP experiment (default: tracking.experiment)")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--run-name", help="the federation's name (default: <algorithm>-seed<seed>); its store is "
                     "<data-root>/outputs/federations/<run-name> unless --store is given")
    run.add_argument("--store", default="", help="the federation's store (checkpoints, history), on the volume")
    run.add_argument("--tracking-uri", default="", help="MLflow server the steps log to ('' for none)")
    chain = argparse.ArgumentParser(add_help=False)
    chain.add_argument("--state", help="the driver's state file (default: outputs/drive/<run-name>.json)")
    chain.add_argument("--max-failures", type=_count(1), default=3, help="failed runs in a row before giving up")

    c = psub.add_parser("compile", parents=[common, shape, cluster], help="Write the pipeline YAML.")
    c.add_argument("--out", default="outputs/pipeline.yaml", help="where to write it (default: %(default)s)")
    c.set_defaults(func=cmd_compile)

    s = psub.add_parser("submit", parents=[common, shape, cluster, server, run],
                        help="Submit one run (up to --rounds-per-run rounds) with kfp.Client.")
    s.set_defaults(func=cmd_submit)

    d = psub.add_parser("drive", parents=[common, shape, cluster, server, run, chain],
                        help="Submit runs until the federation is complete; run it again to resume.")
    d.add_argument("--poll-seconds", type=_seconds, default=30.0, help="how often to ask for a run's state")
    d.set_defaults(func=cmd_drive)

    r = psub.add_parser("run-local", parents=[common, shape, run, chain],
                        help="Run the whole federation here with kfp.local, run after run.")
    r.set_defaults(accelerator_type="", accelerator_count=0, cpu="1", memory="4Gi", retries=0, parallelism=0,
                   pvc="", data_root=".")
    r.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="subprocess: this environment; docker: the image (docker/build-image.sh)")
    r.add_argument("--image", type=_image, default=DEFAULT_IMAGE,
                   help="the image for --runner docker (default: %(default)s)")
    r.add_argument("--env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every step (repeatable), e.g. MLflow credentials")
    r.add_argument("--pipeline-root", default="outputs/kfp_local", help="where kfp.local keeps artifacts and logs")
    r.add_argument("--out", default="outputs/pipeline/model.safetensors", help="copy the final model here")
    r.set_defaults(func=cmd_run_local)

    from fedcmi.cli import add_compare_options

    cmp = psub.add_parser("compare", parents=[common, shape, cluster],
                          help="fedcmi compare with each trial a federation of pipeline runs: kfp.local here, or "
                          "a Kubeflow Pipelines server with --host (run where the data volume is mounted).")
    add_compare_options(cmp)
    cmp.set_defaults(func=cmd_compare, data_root=".")
    cmp.add_argument("--host", help="a Kubeflow Pipelines API endpoint; without it, trials run with kfp.local")
    cmp.add_argument("--namespace", default=None, help="the Kubeflow namespace")
    cmp.add_argument("--experiment", help="KFP experiment (default: tracking.experiment)")
    cmp.add_argument("--poll-seconds", type=_seconds, default=30.0, help="how often to ask for a run's state")
    cmp.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                     help="without --host: subprocess (this environment) or docker (the image)")
    cmp.add_argument("--max-failures", type=_count(1), default=3,
                     help="failed runs in a row before a trial gives up")
