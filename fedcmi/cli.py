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

from fedcmi.config import Config, ConfigError, load_config
from fedcmi.divergence import Diverged

EXIT_CONFIG = 2
EXIT_FAILURE = 1
EXIT_DIVERGED = 3


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
    from fedcmi.io import write_json
    from fedcmi.locks import beside, exclusive
    from fedcmi.partition import make_partition, save_partition

    dm = DataModule(cfg.data.prepared_dir)
    part = make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes)
    stats = part.stats()
    stats_path = Path(args.stats) if args.stats else cfg.partition.file.with_name("partition_stats.json")
    with exclusive(beside(cfg.partition.file), f"the partition file {cfg.partition.file}"):
        save_partition(part, cfg.partition.file)
        write_json(stats_path, stats)
    print(f"wrote {cfg.partition.file} and {stats_path}: {stats['num_clients']} clients, "
          f"{stats['size_min']}-{stats['size_max']} samples each, {stats['clients_by_modalities']}")
    return 0


def _resume_fingerprint(cfg: Config) -> str | None:
    """The fingerprint a checkpoint of ``cfg`` carries (None when the data or partition is not there yet)."""
    from fedcmi.data import DataModule
    from fedcmi.engine import run_fingerprint

    try:
        return run_fingerprint(cfg, cfg.partition.file, DataModule(cfg.data.prepared_dir).meta)
    except (OSError, ValueError):
        return None


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.locks import exclusive, inside

    out = Path(args.out) if args.out else cfg.output.dir / "train"
    if cfg.tracking.enabled and not args.no_tracking:
        from fedcmi.tracking import check_reachable, tracking_uri

        check_reachable(tracking_uri(cfg))  # before anything is made, the output folder's lock included
    with exclusive(inside(out), f"the output folder {out}"):  # training, outputs and tracking: one writer
        return _train(cfg, args, out)


def _train(cfg: Config, args: argparse.Namespace, out: Path) -> int:
    from fedcmi.engine import train, write_outputs
    from fedcmi.plots import round_curves, run_title

    tracker, run_id = None, None
    if cfg.tracking.enabled and not args.no_tracking:
        from fedcmi.tracking import RunTracker, continued_run

        run_id = continued_run(cfg, out, _resume_fingerprint(cfg) if args.resume != "never" else None)
        # the same training, resumed, goes on in its run (curves unbroken); else a new run
        if run_id is not None:
            tracker = RunTracker(cfg, run_id=run_id)
        else:
            from fedcmi.data import DataModule

            tracker = RunTracker(cfg, data=DataModule(cfg.data.prepared_dir))
    try:
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress,
                       on_round=tracker.log_round if tracker else None)
    except BaseException:
        if tracker is not None:  # the run ends FAILED, not left RUNNING; checkpoints keep the finished rounds
            tracker.errors.append("training stopped")
            tracker.close()
        raise
    paths = write_outputs(result, cfg, out)
    paths["curves"] = round_curves(result.history, cfg.data.modalities, out / "curves.png",
                                   run_title(cfg))
    summary: dict = {"final": {k: round(v, 4) for k, v in result.final.items() if not k.startswith("class_acc_")},
                     "files": {k: str(v) for k, v in paths.items()},
                     "resumed_from_round": result.resumed_from, "seconds": round(result.seconds, 2)}
    if tracker is not None and run_id is not None and result.resumed_from >= cfg.federation.rounds:
        # nothing trained: the run already holds this model and its figures; log nothing twice
        from fedcmi.tracking import read_run_info

        info = read_run_info(out / "mlflow_run.json")
        tracker.close()
        summary["mlflow"] = {**info, "note": "all rounds were done; nothing new to log"}
    elif tracker is not None:
        from fedcmi.data import DataModule
        from fedcmi.serving import ModelPackage
        from fedcmi.tracking import write_run_info

        package = ModelPackage.of(cfg, result.state, DataModule(cfg.data.prepared_dir))
        errors = tracker.log_outcome([paths["history"], paths["metrics"], paths["curves"]], package)
        info = {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "model_uri": tracker.model_uri,
                "experiment": cfg.tracking.experiment, "errors": errors, "replayed": tracker.replayed}
        write_run_info(out / "mlflow_run.json", info)
        summary["mlflow"] = info
        if tracker.replayed:
            print(f"fedcmi: warning: the tracking server was away; {len(tracker.replayed)} call(s) were logged "
                  "late, once it answered again.", file=sys.stderr)
        if errors:
            print(f"fedcmi: warning: tracking failed {len(errors)} time(s), first: {errors[0]}. "
                  f"Training finished and every result is in {out}.", file=sys.stderr)
    else:
        from fedcmi.io import write_json

        write_json(out / "mlflow_run.json", {"run_id": None, "reason": "tracking disabled"})
    _print_json(summary)
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.data import DataModule
    from fedcmi.io import write_json
    from fedcmi.plots import confusion, confusion_records
    from fedcmi.steps import evaluate_step

    model = Path(args.model) if args.model else cfg.output.dir / "train" / "model.safetensors"
    out = Path(args.out) if args.out else None
    run_info = model.parent / "mlflow_run.json"
    logs = args.log and cfg.tracking.enabled and run_info.is_file()
    if logs:  # a damaged run record is an error before anything is evaluated or written
        from fedcmi.tracking import read_run_info

        logs = bool(read_run_info(run_info).get("run_id"))
    metrics = evaluate_step(cfg, model, out, probe=args.probe, split=args.split)
    cm = metrics.pop("confusion")
    if args.plots:
        plots = Path(args.plots)
        names = DataModule(cfg.data.prepared_dir).spec.class_names
        write_json(plots / "confusion.json", confusion_records(cm, names))
        confusion(cm, names, plots / "confusion.png")
    if logs:
        from fedcmi.tracking import log_to_run

        # the test split's figures are the last round's (the same model), already in the run as eval/...
        logged = {} if args.split == "test" else {f"{args.split}/{k}": v for k, v in metrics.items()}
        errors = log_to_run(cfg, run_info, logged,
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
    from fedcmi.steps import init_step

    print(init_step(cfg, args.out))
    return 0


def cmd_sample(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.steps import sample_step

    _print_json({"round": args.round, "clients": sample_step(cfg, args.round)})
    return 0


def cmd_client_train(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.steps import client_train_step

    path = client_train_step(cfg, args.global_model, args.client, args.round, args.out)
    print(path if path else f"client {args.client} has nothing to train under {cfg.algorithm.name}; no update written")
    return 0


def cmd_aggregate(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.io import write_json
    from fedcmi.steps import aggregate_step

    path, summary = aggregate_step(cfg, args.global_model, args.updates, args.round, args.out)
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
    p.add_argument("--round", type=int, required=True, help="round index, from 0")
    p = add("client-train", cmd_client_train, "One client's local training for one round, file to file.")
    p.add_argument("--global-model", required=True, help="the round's global model (safetensors)")
    p.add_argument("--client", type=int, required=True, help="client id")
    p.add_argument("--round", type=int, required=True, help="round index, from 0")
    p.add_argument("--out", required=True, help="update file to write")
    p = add("aggregate", cmd_aggregate, "Aggregate a round's client update files into the next global model.")
    p.add_argument("--global-model", required=True, help="the round's global model")
    p.add_argument("--updates", nargs="+", required=True, help="client update files")
    p.add_argument("--round", type=int, required=True, help="round index, from 0")
    p.add_argument("--out", required=True, help="global model file to write")
    p.add_argument("--summary", help="write the round summary JSON here")
    _extend(sub, common)
    return parser


#: Entry-point group of command-line extensions: each is ``add_commands(subparsers, common_parser)``. The
#: Kubeflow layer adds ``fedcmi pipeline`` through it, so this package never imports that layer.
COMMANDS_GROUP = "fedcmi.commands"


def _extend(sub, common) -> None:
    """Subcommands of the tracking layer, and of the extensions installed (see :data:`COMMANDS_GROUP`)."""
    from importlib.metadata import entry_points

    from fedcmi import tracking_cli

    tracking_cli.add_commands(sub, common)
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub, common)


def _known_errors() -> tuple[type[BaseException], ...]:
    from fedcmi.data import DataError
    from fedcmi.data.text import TextError
    from fedcmi.engine import ResumeError
    from fedcmi.errors import CommandError
    from fedcmi.federation import RoundFailed
    from fedcmi.io import JsonFileError, ModelFileError
    from fedcmi.locks import Busy
    from fedcmi.models import EncoderError
    from fedcmi.partition import PartitionError
    from fedcmi.tracking import TrackingUnavailable

    return (DataError, TextError, ResumeError, RoundFailed, ModelFileError, EncoderError, PartitionError,
            TrackingUnavailable, CommandError, Busy, JsonFileError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.params, args.overrides)
    except ConfigError as exc:
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return int(args.func(cfg, args) or 0)
    except ConfigError as exc:
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Diverged as exc:
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except _known_errors() as exc:
        print(f"fedcmi: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("fedcmi: interrupted; the last complete round is checkpointed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
