"""A round's parts as file-to-file steps, for runners outside this process.

Each step reads the prepared data, the partition file and model states
(safetensors) and writes safetensors or JSON. A Kubeflow component calls
exactly these; the in-process engine calls the same :class:`Federation`
methods without the files in between, so both give the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcmi.algorithms import ClientUpdate
from fedcmi.algorithms.aggregation import StateDict
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.evaluation import evaluate_model, report_order
from fedcmi.federation import Federation, resolve_device, use_threads
from fedcmi.io import ModelFileError, load_state, save_state, write_json
from fedcmi.models.networks import MultimodalNet
from fedcmi.partition import load_partition


def _federation(cfg: Config) -> Federation:
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def _load_global(fed: Federation, path: str | Path):
    state, meta = load_state(path)
    expected = fed.model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing or set(state) - set(expected):
        raise ModelFileError(
            f"{path} does not fit the {fed.cfg.algorithm.name} model of these params "
            f"(missing {missing[:3]}, unexpected {sorted(set(state) - set(expected))[:3]})"
        )
    return state, meta


def load_model(cfg: Config, state: StateDict | str | Path, data: DataModule | None = None) -> MultimodalNet:
    """The network of these params holding ``state`` (a state dict or a model file), in eval mode."""
    from fedcmi.models import build_model

    if not isinstance(state, dict):
        state, _ = load_state(state)
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
    return _federation(cfg).sample_clients(rnd)


def client_train_step(cfg: Config, global_model: str | Path, client_id: int, rnd: int, out: str | Path) -> Path | None:
    """Train client ``client_id`` in round ``rnd`` from ``global_model``.

    A client with nothing to train (single-modality FedAvg on a client without
    that modality) gets a ``skipped`` marker file and None is returned, so a
    pipeline always has its output and aggregation ignores it.
    """
    fed = _federation(cfg)
    state, _ = _load_global(fed, global_model)
    update = fed.train_client(state, client_id, rnd)
    if update is None:
        save_state(out, {}, {"kind": "skipped", "round": rnd, "client_id": client_id})
        return None
    meta = {"kind": "update", "round": rnd, "client_id": client_id, "num_examples": update.num_examples,
            "modalities": list(update.modalities), "metrics": update.metrics}
    return save_state(out, update.state, meta)


def read_update(path: str | Path) -> ClientUpdate | None:
    """A client update file; None for a ``skipped`` marker."""
    state, meta = load_state(path)
    if meta.get("kind") == "skipped":
        return None
    if meta.get("kind") != "update":
        raise ModelFileError(f"{path} is not a client update (kind {meta.get('kind')!r})")
    return ClientUpdate(int(meta["client_id"]), state, int(meta["num_examples"]), tuple(meta["modalities"]),
                        meta.get("metrics", {}))


def aggregate_step(
    cfg: Config, global_model: str | Path, updates: Sequence[str | Path], rnd: int, out: str | Path
) -> tuple[Path, dict]:
    """Aggregate the round's update files into the next global model; returns it and the round summary."""
    fed = _federation(cfg)
    state, _ = _load_global(fed, global_model)
    read = [read_update(p) for p in updates]
    res = fed.aggregate(state, [u for u in read if u is not None], rnd)
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
    res = evaluate_model(net, data, cfg.evaluation.batch_size, device, probe=probe, split=split)
    if out is not None:
        write_json(out, {**report_order(res.metrics), "confusion": res.confusion}, sort_keys=False)
    return {**res.metrics, "confusion": res.confusion}
