"""A round's parts as file-to-file steps, for runners outside this process.

Each step reads the prepared data, the partition file and model states
(safetensors) and writes safetensors or JSON. A Kubeflow component calls
exactly these; the in-process engine calls the same :class:`Federation`
methods without the files in between, so both give the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from fedcmi.algorithms.aggregation import StateDict, model_state
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.errors import CommandError
from fedcmi.evaluation import evaluate_model, report_order
from fedcmi.federation import Federation, resolve_device, use_threads
from fedcmi.io import ModelFileError, load_state, save_state, write_json
from fedcmi.models.networks import MultimodalNet
from fedcmi.partition import load_partition
from fedcmi.update_files import claimed_client, read_update, write_update


def check_round(cfg: Config, rnd: int) -> int:
    """``rnd`` when it is a round of this federation (0-based); a CommandError naming the range if not."""
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd < cfg.federation.rounds:
        raise CommandError(f"round {rnd!r} is not a round of this federation: rounds are 0..{cfg.federation.rounds - 1}"
                           f" (federation.rounds={cfg.federation.rounds})")
    return rnd


def _federation(cfg: Config) -> Federation:
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def _load_global(fed: Federation, path: str | Path):
    state, meta = load_state(path)
    weights = model_state(state)  # a global state may carry the server's state (aux/ keys) beside the model
    expected = fed.model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing or set(weights) - set(expected):
        raise ModelFileError(
            f"{path} does not fit the {fed.cfg.algorithm.name} model of these params "
            f"(missing {missing[:3]}, unexpected {sorted(set(weights) - set(expected))[:3]})"
        )
    return state, meta


def load_model(cfg: Config, state: StateDict | str | Path, data: DataModule | None = None) -> MultimodalNet:
    """The network of these params holding ``state`` (a state dict or a model file), in eval mode."""
    from fedcmi.models import build_model

    if not isinstance(state, dict):
        state, _ = load_state(state)
    state = model_state(state)
    net = build_model(cfg, (data or DataModule(cfg.data.prepared_dir)).spec)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"the model state does not fit the {cfg.algorithm.name} model of these params: "
                             f"{str(exc).splitlines()[0]}") from None
    return net.eval()


def init_step(cfg: Config, out: str | Path) -> Path:
    """The seeded initial global model."""
    fed = _federation(cfg)
    return save_state(out, fed.initial_state(), {"kind": "global", "round": 0})


def sample_step(cfg: Config, rnd: int) -> list[int]:
    """The clients of round ``rnd`` (0-based)."""
    return _federation(cfg).sample_clients(check_round(cfg, rnd))


def client_train_step(cfg: Config, global_model: str | Path, client_id: int, rnd: int, out: str | Path) -> Path | None:
    """Train client ``client_id`` in round ``rnd`` from ``global_model``.

    A client with nothing to train (single-modality FedAvg on a client without
    that modality) gets a ``skipped`` marker file and None is returned, so a
    pipeline always has its output and aggregation checks it against the partition.
    """
    check_round(cfg, rnd)
    fed = _federation(cfg)
    fed.partition.client(client_id)  # a PartitionError naming the clients there are
    state, _ = _load_global(fed, global_model)
    update = fed.train_client(state, client_id, rnd)
    path = write_update(Path(out), rnd, client_id, update)
    return path if update is not None else None


def aggregate_step(
    cfg: Config, global_model: str | Path, updates: Sequence[str | Path], rnd: int, out: str | Path
) -> tuple[Path, dict]:
    """Aggregate the round's update files into the next global model; returns it and the round summary.

    Every file is checked against the round (see :mod:`fedcmi.admission`); a refused one is listed in the
    summary's ``rejected`` with the reason, under the client id it claims (-1 when it claims none).
    """
    check_round(cfg, rnd)
    fed = _federation(cfg)
    state, _ = _load_global(fed, global_model)
    outcomes = []
    for p in updates:
        cid = claimed_client(Path(p))
        outcomes.append((cid if cid is not None else -1, partial(read_update, p, rnd)))
    res = fed.aggregate_outcomes(state, outcomes, rnd)
    summary = {"round": rnd + 1, "accepted": res.accepted, "rejected": res.rejected, "idle": res.idle,
               **res.summary}
    return save_state(out, res.state, {"kind": "global", "round": rnd + 1}), summary


def evaluate_step(cfg: Config, model: str | Path, out: str | Path | None = None, probe: bool = False,
                  split: str = "test") -> dict:
    """Evaluate a model file on ``split`` (test by default); writes metrics (and the confusion matrix) as JSON.

    Needs the prepared data and the model, not the partition.
    """
    use_threads(cfg.threads)
    data = DataModule(cfg.data.prepared_dir)
    device = resolve_device(cfg.device)
    net = load_model(cfg, model, data).to(device)
    res = evaluate_model(net, data, cfg.evaluation.batch_size, device, probe=probe, split=split,
                         missing_modality=cfg.evaluation.missing_modality, seed=cfg.seed)
    if out is not None:
        write_json(out, {**report_order(res.metrics), "confusion": res.confusion}, sort_keys=False)
    return {**res.metrics, "confusion": res.confusion}
