"""The ``fedcmi register`` subcommand: the trained model into the MLflow registry."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fedcmi.config import Config, ConfigError
from fedcmi.errors import CommandError


def cmd_register(cfg: Config, args: argparse.Namespace) -> int:
    # MLflow and torch load only when this command runs, not when the command line is built
    from fedcmi.io import JsonFileError, read_json, write_json
    from fedcmi.tracking.inputs import data_hash
    from fedcmi.tracking.model_registry import register_model
    from fedcmi.tracking.run import RUN_INFO, read_run_info

    train_dir = cfg.output.dir / "train"
    info_path = train_dir / RUN_INFO
    if not info_path.is_file():
        raise CommandError(f"{info_path} not found: run `fedcmi train` with tracking enabled first")
    info = read_run_info(info_path)
    if not cfg.tracking.enabled or not info.get("run_id"):
        result = {"skipped": "tracking is disabled (tracking.enabled=false): nothing to register"}
        if args.out:
            write_json(args.out, result)
        print(result["skipped"])
        return 0
    if not info.get("model_uri"):
        raise CommandError(f"the training run {info['run_id']} has no logged model (tracking failed: "
                                f"{info.get('errors')})")
    metrics_file = Path(args.metrics) if args.metrics else cfg.output.dir / "eval" / "metrics.json"
    metrics = read_json(metrics_file, expect=dict)
    metric = cfg.tracking.headline_metric
    if metric not in metrics:
        raise ConfigError(
            f"tracking.headline_metric: {metric!r} is not among the evaluation metrics {sorted(metrics)[:8]}...")
    value = metrics[metric]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise JsonFileError(f"{metrics_file}: {metric} is {value!r}, not a finite number; rerun `fedcmi evaluate`")
    unstable = _unstable(cfg, train_dir)
    if unstable:  # a run that collapsed or swung is no candidate, whatever its last figure
        refused = {"registered": False, "run_id": info["run_id"], "reason": unstable}
        if args.out:
            write_json(args.out, refused)
        print(f"fedcmi: not registered: the run is {unstable}", file=sys.stderr)
        return 0
    data_id = data_hash(cfg, verify=True)  # before the registry is touched
    figures = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    from fedcmi.data import DataModule
    from fedcmi.protocols import data_card

    card = data_card(cfg, DataModule(cfg.data.prepared_dir).spec)
    result = register_model(cfg, info["run_id"], info["model_uri"], figures, data_id, card)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if not result["promoted"]:
        print(f"fedcmi: v{result['version']} is the candidate, not the champion: {result['reason']}", file=sys.stderr)
    return 0


def _unstable(cfg: Config, train_dir: Path) -> str | None:
    """Why the trained run is unstable (from its history.json), or None."""
    from fedcmi.data import DataModule
    from fedcmi.io import read_json
    from fedcmi.outputs import HISTORY
    from fedcmi.round.record import RoundRecord
    from fedcmi.stability import run_stability

    path = train_dir / HISTORY
    if not path.is_file():
        return None
    history = [RoundRecord.from_json(r) for r in read_json(path, expect=list)]
    steady = run_stability(history, DataModule(cfg.data.prepared_dir))
    return steady.reason(cfg.optim.lr) if steady.unstable else None


def add_commands(sub, common) -> None:
    p = sub.add_parser("register", parents=[common], help="Register the trained model in the MLflow registry: "
                       "alias 'candidate' always, 'champion' only when it beats the champion on the same test data.")
    p.add_argument("--metrics", help="evaluation metrics JSON (default: <output.dir>/eval/metrics.json)")
    p.add_argument("--out", help="write the registration result JSON here")
    p.set_defaults(func=cmd_register, reads_data=True)
