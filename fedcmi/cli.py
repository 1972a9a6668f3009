"""The ``fedcmi`` command line.

Every subcommand takes ``--params params.yaml`` and any number of
``--set key.path=value`` overrides. A bad setting exits with code 2 and one
clear message before anything is written; a training run that diverges
(non-finite loss, accuracy fallen to chance) exits with code 3; other
failures exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedcmi.config import Config, load_config
from fedcmi.errors import EXIT_FAILURE, EXIT_INTERRUPTED, FedcmiError

if TYPE_CHECKING:
    from fedcmi.compare import TrialRunner


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="the params file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set algorithm.name=fedavg (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- commands ---------------------------------------------------------------
def cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.data import prepare

    summary = prepare(cfg, progress=not args.no_progress)
    skipped = summary.pop("skipped_samples", [])  # printed below, one line each, not in the JSON
    _print_json(summary)
    if skipped:
        print(f"fedcmi: skipped {len(skipped)} sample(s); all are listed under 'report' in "
              f"{Path(summary['path']) / 'meta.json'}:", file=sys.stderr)
        for s in skipped[:10]:
            print(f"  {s['split']}: {s['key']}: {s['reason']}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more", file=sys.stderr)
    return 0


def cmd_partition(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.data import DataModule
    from fedcmi.io import check_replaceable, write_json
    from fedcmi.locks import beside, exclusive
    from fedcmi.partition import make_partition, save_partition

    dm = DataModule(cfg.data.prepared_dir)
    part = make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes, dm.train.groups)
    stats = part.stats()
    stats_path = Path(args.stats) if args.stats else cfg.partition.file.with_name("partition_stats.json")
    for path, body in ((cfg.partition.file, part.to_json()), (stats_path, stats)):  # both or neither
        check_replaceable(path, json.dumps(body).encode())
    with exclusive(beside(cfg.partition.file), f"the partition file {cfg.partition.file}"):
        save_partition(part, cfg.partition.file)
        write_json(stats_path, stats)
    print(f"wrote {cfg.partition.file} and {stats_path}: {stats['num_clients']} clients, "
          f"{stats['size_min']}-{stats['size_max']} samples each, {stats['clients_by_modalities']}")
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.data import DataModule
    from fedcmi.federation import check_inputs
    from fedcmi.locks import exclusive, inside
    from fedcmi.partition import load_partition

    out = Path(args.out) if args.out else cfg.output.dir / "train"
    # the inputs first: a mismatch is one line with nothing written, not even the output folder's lock
    check_inputs(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    if cfg.tracking.enabled and not args.no_tracking:
        from fedcmi.tracking.server import check_reachable, tracking_uri

        check_reachable(tracking_uri(cfg))  # before anything is made, the output folder's lock included
    with exclusive(inside(out), f"the output folder {out}"):  # training, outputs and tracking: one writer
        return _train(cfg, args, out)


def _continues(cfg: Config, out: Path, data) -> bool:
    """Whether a training in ``out`` continues the one its checkpoint holds (same settings and data)."""
    from fedcmi.round.ledger import Ledger, checkpoint_folder

    return Ledger.of(cfg, checkpoint_folder(out), data).matches()


def _train(cfg: Config, args: argparse.Namespace, out: Path) -> int:
    from fedcmi.data import DataModule
    from fedcmi.outputs import TrainFiles, write_model
    from fedcmi.runners.engine import train

    files = TrainFiles(cfg, out)
    sinks: list = [files]
    run = None
    if cfg.tracking.enabled and not args.no_tracking:
        from fedcmi.tracking.run import RUN_INFO, TrainingRun
        from fedcmi.tracking.sink import MlflowSink

        data = DataModule(cfg.data.prepared_dir)
        # the same training, resumed, goes on in its run (curves unbroken); else a new run
        resume = args.resume != "never" and _continues(cfg, out, data)
        run = TrainingRun.open(cfg, out / RUN_INFO, data=data, resume=resume)
        mlflow_sink = MlflowSink(run)
        sinks.append(mlflow_sink)
    try:
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress, sinks=sinks)
    except BaseException:
        if run is not None:  # the run ends FAILED, not left RUNNING; checkpoints keep the finished rounds
            run.fail("training stopped")
        raise
    paths = {"model": write_model(out, result.state, cfg), **files.paths}
    final = {k: round(v, 4) for k, v, meta in result.final.items() if meta["per"] != "class"}
    summary: dict = {"final": final,
                     "files": {k: str(v) for k, v in paths.items()},
                     "resumed_from_round": result.resumed_from, "seconds": round(result.seconds, 2)}
    from fedcmi.stability import run_stability

    steady = run_stability(result.history, DataModule(cfg.data.prepared_dir))
    summary["stability"] = {k: round(v, 4) for k, v in steady.figures().items()}
    if steady.unstable:  # finished, but not a model to take: said here, in the run, and at `register`
        reason = steady.reason(cfg.optim.lr)
        summary["stability"]["reason"] = reason
        print(f"fedcmi: warning: the run is {reason}", file=sys.stderr)
    if run is not None:
        run.log_metrics({f"run/{k}": v for k, v in steady.figures().items()}, step=cfg.federation.rounds,
                        what="stability")
    backfilled: list[int] = []
    if run is not None and result.resumed_from:  # rounds an outage kept from the run it continues
        backfilled = mlflow_sink.backfill([r for r in result.history if r.round <= result.resumed_from])
        if backfilled:
            summary["mlflow_backfilled_rounds"] = backfilled
    if run is not None and result.resumed_from >= cfg.federation.rounds and run.model_uri:
        # nothing trained: the run holds this model; it ends FINISHED only once nothing is missing from it
        errors = run.close()
        summary["mlflow"] = {"run_id": run.run_id, "tracking_uri": run.uri, "model_uri": run.model_uri,
                             "errors": errors,
                             "note": (f"all rounds were done; logged rounds {backfilled} the run lacked"
                                      if backfilled else "all rounds were done; nothing new to log")}
    elif run is not None:
        from fedcmi.serving import ModelPackage

        package = ModelPackage.of(cfg, result.state, DataModule(cfg.data.prepared_dir))
        errors = run.finish([paths["history"], paths["metrics"], paths["curves"]], package)
        summary["mlflow"] = {"run_id": run.run_id, "tracking_uri": run.uri, "model_uri": run.model_uri,
                             "experiment": cfg.tracking.experiment, "errors": errors, "replayed": run.replayed}
        if run.replayed:
            print(f"fedcmi: warning: the tracking server was away; {len(run.replayed)} call(s) were logged "
                  "late, once it answered again.", file=sys.stderr)
        if errors:
            print(f"fedcmi: warning: tracking failed {len(errors)} time(s), first: {errors[0]}. "
                  f"Training finished and every result is in {out}.", file=sys.stderr)
    else:
        from fedcmi.tracking.run import RUN_INFO, record_disabled

        record_disabled(out / RUN_INFO)
    _print_json(summary)
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.data import DataModule
    from fedcmi.io import write_json
    from fedcmi.outputs import MODEL
    from fedcmi.plots import confusion, confusion_records
    from fedcmi.runners.files import evaluate_step
    from fedcmi.tracking.run import RUN_INFO, add_to_run, read_run_info

    model = Path(args.model) if args.model else cfg.output.dir / "train" / MODEL
    out = Path(args.out) if args.out else None
    run_info = model.parent / RUN_INFO
    logs = args.log and cfg.tracking.enabled and run_info.is_file()
    if logs:  # a damaged run record is an error before anything is evaluated or written
        logs = bool(read_run_info(run_info).get("run_id"))
    ev = evaluate_step(cfg, model, out, probe=args.probe, split=args.split)
    metrics = ev.flat()
    if args.plots:
        plots = Path(args.plots)
        names = DataModule(cfg.data.prepared_dir).spec.class_names
        write_json(plots / "confusion.json", confusion_records(ev.confusion, names))
        confusion(ev.confusion, names, plots / "confusion.png")
    if logs:
        # the test split's figures are the last round's (the same model), already in the run as eval/...
        logged = {} if args.split == "test" else {f"{args.split}/{k}": v for k, v in metrics.items()}
        errors = add_to_run(cfg, run_info, logged,
                            [p for p in (out, Path(args.plots) / "confusion.png" if args.plots else None) if p])
        for e in errors:
            print(f"fedcmi: warning: tracking failed: {e}", file=sys.stderr)
    _print_json({k: round(v, 4) for k, v in metrics.items()})
    return 0


def cmd_plots_template(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.plots import write_page_template

    try:
        print(write_page_template(args.out))
    except ModuleNotFoundError as exc:
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.runners.files import init_step

    print(init_step(cfg, args.out))
    return 0


def cmd_sample(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.runners.files import late_step, sample_step

    clients = sample_step(cfg, args.round)
    out: dict = {"round": args.round, "clients": clients}
    if cfg.federation.latency.model != "none":
        out["late"] = {str(c): why for c, why in late_step(cfg, args.round, clients).items()}
    _print_json(out)
    return 0


def cmd_client_train(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.runners.files import client_train_step

    path = client_train_step(cfg, args.global_model, args.client, args.round, args.out)
    print(path if path else f"client {args.client} has nothing to train under {cfg.algorithm.name}; no update written")
    return 0


def cmd_aggregate(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.io import write_json
    from fedcmi.runners.files import aggregate_step

    path, rec = aggregate_step(cfg, args.global_model, args.updates, args.round, args.out)
    summary = rec.to_json()
    if args.summary:
        write_json(args.summary, summary)
    _print_json({"model": str(path), **summary})
    return 0


# -- wiring -----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="fedcmi",
        description="Balanced multimodal federated learning (FedCMI, arXiv 2401.00894). "
        "Settings come from params.yaml; override any with --set key.path=value.",
    )
    from fedcmi import __version__

    parser.add_argument("--version", action="version", version=f"fedcmi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = add("prepare", cmd_prepare, "Turn the configured dataset into the prepared tensor folder (data.prepared_dir): "
            "decoded once, memory-mapped, with a report of skipped samples in its meta.json.")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("partition", cmd_partition, "Split the training set across clients; write partition.file and statistics.")
    p.add_argument("--stats", help="where to write per-client statistics (default: beside the partition file)")
    p = add("train", cmd_train, "Run the federated rounds in this process, with a progress bar; "
            "checkpoints every round and resumes a stopped run.")
    p.add_argument("--out", help="output folder (default: <output.dir>/train)")
    p.add_argument("--resume", choices=["auto", "never", "must"], default="auto",
                   help="auto: resume a matching checkpoint (default); never: start over; must: fail without one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (same as tracking.enabled=false)")
    p = add("evaluate", cmd_evaluate, "Evaluate a global model file on the test split.")
    p.add_argument("--model", help="model file (default: <output.dir>/train/model.safetensors)")
    p.add_argument("--out", help="write metrics JSON here")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="the split to evaluate on (val: the validation split, for choosing settings)")
    p.add_argument("--probe", action="store_true", help="also fit a ridge probe on each frozen encoder")
    p.add_argument("--plots", help="write the confusion matrix (JSON for dvc plots, and PNG) into this folder")
    p.add_argument("--log", action="store_true", help="log the metrics into the training run's MLflow run")
    p = add("plots-template", cmd_plots_template, "Write an HTML page template that shows plots offline "
            "(Vega inlined): dvc plots show --html-template FILE.")
    p.add_argument("out", nargs="?", default="plots-offline.html", help="the template file to write")
    p = add("init", cmd_init, "Write the seeded initial global model.")
    p.add_argument("--out", required=True, help="model file to write")
    p = add("sample", cmd_sample, "The clients a round samples (what aggregate admits), as JSON.")
    p.add_argument("--round", type=int, required=True, help="round number, from 1")
    p = add("client-train", cmd_client_train, "One client's local training for one round, file to file.")
    p.add_argument("--global-model", required=True, help="the round's global model (safetensors)")
    p.add_argument("--client", type=int, required=True, help="client id")
    p.add_argument("--round", type=int, required=True, help="round number, from 1")
    p.add_argument("--out", required=True, help="update file to write")
    p = add("aggregate", cmd_aggregate, "Aggregate a round's client update files into the next global model.")
    p.add_argument("--global-model", required=True, help="the round's global model")
    p.add_argument("--updates", nargs="+", required=True, help="client update files")
    p.add_argument("--round", type=int, required=True, help="round number, from 1")
    p.add_argument("--out", required=True, help="global model file to write")
    p.add_argument("--summary", help="write the round summary JSON here")
    p = add("compare", cmd_compare, "The fair comparison on your data: methods x a learning-rate grid chosen on "
            "validation x seeds, paired differences to a baseline; resumable; a report and an MLflow parent run.")
    add_compare_options(p)
    for name in READS_DATA:
        sub.choices[name].set_defaults(reads_data=True)
    _extend(sub, common)
    return parser


def add_compare_options(p: argparse.ArgumentParser) -> None:
    """The options of a comparison, wherever its trials train (here, or as pipeline runs)."""
    p.add_argument("--method", action="append", default=[], help="NAME (an algorithm at its defaults) or "
                   "LABEL:key=value[,key=value...]; repeat; default: every registered algorithm but unimodal")
    p.add_argument("--baseline", help="the method the others are paired against (default: fedavg)")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                   help="the starting learning-rate grid; it grows past an edge that wins")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1],
                   help="the seeds whose mean validation headline chooses each method's lr")
    p.add_argument("--max-extensions", type=int, default=3, help="how often a grid may grow past its edge")
    p.add_argument("--jobs", type=int, default=0, help="trials at once, one torch thread each (0: the cores)")
    p.add_argument("--work", default="outputs/compare", help="the trials' cache and the report (a rerun resumes)")
    p.add_argument("--title", help="the report's title")


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    return run_comparison(cfg, args)


def run_comparison(cfg: Config, args: argparse.Namespace, runner: TrialRunner | None = None) -> int:
    """A comparison from its options; trials train through ``runner`` (default: processes here)."""
    import shlex

    import yaml

    from fedcmi.compare import (
        Method,
        Plan,
        Trial,
        compare,
        default_jobs,
        default_methods,
        prepare_seed,
        summary,
        trial_config,
        trial_overrides,
    )
    from fedcmi.compare_report import write_report
    from fedcmi.data import DataModule
    from fedcmi.io import write_json
    from fedcmi.protocols import data_card

    methods = [Method.parse(m) for m in args.method] if args.method else default_methods()
    names = [m.name for m in methods]
    baseline = args.baseline or ("fedavg" if "fedavg" in names else names[0])
    jobs = runner.jobs if runner is not None else args.jobs or default_jobs()
    plan = Plan(methods, baseline, sorted(args.lrs), list(args.seeds), list(args.select_seeds),
                args.max_extensions, jobs, cfg.tracking.headline_metric, list(args.overrides))
    plan.check()
    work = Path(args.work)
    params = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    title = args.title or f"fedcmi compare: {len(methods)} methods on {cfg.data.name}"
    command = "fedcmi " + shlex.join(sys.argv[1:])
    # the card of the first seed's data: every trial shares its classes, split, clients and metric
    prepare_seed(params, plan.seeds[0], work, plan.extra)
    first = trial_config(params, methods[0], Trial(methods[0].name, plan.lrs[0], plan.seeds[0]), work, plan.extra)
    card = data_card(first, DataModule(first.data.prepared_dir).spec)
    run = None
    if cfg.tracking.enabled:
        from fedcmi.tracking.comparison import ComparisonRun

        run = ComparisonRun(cfg, work, plan, title, card)
    by_name = {m.name: m for m in methods}

    def log_trial(trial: Trial, result: dict) -> None:
        if run is not None:
            m = by_name[trial.method]
            run.log_trial(trial, result, [*plan.extra, *m.overrides, *trial_overrides(first, trial, work)])

    outcome = compare(params, plan, work, progress=lambda line: print(line, file=sys.stderr, flush=True),
                      on_trial=log_trial, runner=runner)
    body = summary(outcome)
    files = [write_json(work / "report" / "summary.json", {"command": command, "card": card, **body}),
             *write_report(outcome, work / "report", title, card, command)]
    if run is not None:
        body["mlflow_parent_run"] = run.finish(files, body)
    print(json.dumps({"report": str(work / "report" / "report.html"), "wall_seconds": body["wall_seconds"],
                      "chosen_lr": {n: m["chosen_lr"] for n, m in body["methods"].items()},
                      "mlflow_parent_run": body.get("mlflow_parent_run")}, indent=2))
    return 0


#: The commands that read the prepared data, and hold it against a `prepare` meanwhile (see
#: :func:`fedcmi.data.reading`); an extension's command opts in with ``set_defaults(reads_data=True)``.
READS_DATA = ("partition", "train", "evaluate", "init", "sample", "client-train", "aggregate")


#: Entry-point group of command-line extensions: each is ``add_commands(subparsers, common_parser)``. The
#: Kubeflow layer adds ``fedcmi pipeline`` through it, so this package never imports that layer.
COMMANDS_GROUP = "fedcmi.commands"


def _extend(sub, common) -> None:
    """Subcommands of the tracking layer, and of the extensions installed (see :data:`COMMANDS_GROUP`)."""
    from importlib.metadata import entry_points

    from fedcmi.tracking import cli as tracking_cli

    tracking_cli.add_commands(sub, common)
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub, common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.params, args.overrides)
        if not getattr(args, "reads_data", False):
            return int(args.func(cfg, args) or 0)
        from fedcmi.data import reading

        with reading(cfg.data.prepared_dir):  # no `prepare` may rewrite the data while this command reads it
            return int(args.func(cfg, args) or 0)
    except FedcmiError as exc:  # a condition fedcmi recognised: its message, its exit code, no traceback
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system's refusal (a full disk, a permission), already saying which file
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("fedcmi: interrupted; the last complete round is checkpointed", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
