"""A round's parts as file-to-file steps, for runners outside this process (``fedcmi init``, ``sample``,
``client-train``, ``aggregate``, ``evaluate``).

Each step reads the prepared data, the partition file and model states (safetensors) and writes
safetensors or JSON. ``aggregate`` closes a round with :func:`~fedcmi.round.close.close_round`, as the
engine and the pipeline do, so the three give the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcmi.algorithms import build_model
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.errors import CommandError
from fedcmi.evaluation import evaluate_model
from fedcmi.federation import Federation, check_inputs, resolve_device, use_threads
from fedcmi.io import ModelFileError, is_int, load_state, save_state
from fedcmi.metrics import Evaluation
from fedcmi.models.networks import MultimodalNet
from fedcmi.outputs import write_metrics
from fedcmi.partition import load_partition
from fedcmi.round.close import close_round
from fedcmi.round.record import RoundRecord
from fedcmi.round.schedule import Schedule
from fedcmi.round.update import StateDict, model_state
from fedcmi.round.update_files import settle_claims, write_update


def check_round(cfg: Config, round_no: int) -> int:
    """``round_no`` when it is a round of this federation (from 1); a CommandError naming the range if not."""
    if not is_int(round_no) or not 1 <= round_no <= cfg.federation.rounds:
        n = cfg.federation.rounds
        raise CommandError(f"round {round_no!r} is not a round of this federation: rounds are 1..{n}"
                           f" (federation.rounds={n})")
    return round_no


def _federation(cfg: Config) -> Federation:
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def _load_global(fed: Federation, path: str | Path) -> StateDict:
    state, _ = load_state(path, checked=True)
    weights = model_state(state)  # a global state may carry the server's state (aux/ keys) beside the model
    expected = fed.model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing or set(weights) - set(expected):
        raise ModelFileError(
            f"{path} does not fit the {fed.cfg.algorithm.name} model of these params "
            f"(missing {missing[:3]}, unexpected {sorted(set(weights) - set(expected))[:3]})"
        )
    return state


def load_model(cfg: Config, state: StateDict | str | Path, data: DataModule | None = None) -> MultimodalNet:
    """The network of these params holding ``state`` (a state dict or a model file), in eval mode."""
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


def sample_step(cfg: Config, round_no: int) -> list[int]:
    """The clients of round ``round_no`` (from 1), of the partition these params made."""
    check_inputs(cfg, None, load_partition(cfg.partition.file))
    return Schedule(cfg).clients(check_round(cfg, round_no))


def late_step(cfg: Config, round_no: int, sampled: list[int]) -> dict[int, str]:
    """Which of round ``round_no``'s ``sampled`` clients the latency model finds late, and why: no need to
    train them, ``aggregate`` discards their updates."""
    from fedcmi.registry import ALGORITHMS
    from fedcmi.round.deadline import cutoff

    strategy = ALGORITHMS.get(cfg.algorithm.name)(cfg)
    return cutoff(cfg, load_partition(cfg.partition.file), round_no, sampled, strategy.participates).late


def client_train_step(cfg: Config, global_model: str | Path, client_id: int, round_no: int,
                      out: str | Path) -> Path | None:
    """Train client ``client_id`` in round ``round_no`` from ``global_model``.

    A client with nothing to train (single-modality FedAvg on a client without that modality) gets a
    ``skipped`` marker file and None is returned, so a pipeline always has its output and aggregation
    checks it against the partition.
    """
    check_round(cfg, round_no)
    fed = _federation(cfg)
    fed.partition.client(client_id)  # a PartitionError naming the clients there are
    state = _load_global(fed, global_model)
    update = fed.train_client(state, client_id, round_no)
    path = write_update(Path(out), round_no, client_id, update)
    return path if update is not None else None


def aggregate_step(cfg: Config, global_model: str | Path, updates: Sequence[str | Path], round_no: int,
                   out: str | Path) -> tuple[Path, RoundRecord]:
    """Close round ``round_no`` from its update files into the next global model (not evaluated: that is
    ``evaluate``'s); returns it and the round's record.

    Every file is checked against the round (see :mod:`fedcmi.round.admission`); a refused one is listed in
    the record's ``rejected`` with the reason, under the client id it claims, or under a negative key when it
    claims none or is a relabelled copy of another client's update (:func:`settle_claims`); the files' order
    never matters.
    """
    check_round(cfg, round_no)
    fed = _federation(cfg)
    state = _load_global(fed, global_model)
    outcomes = settle_claims([Path(p) for p in updates], round_no)
    closed = close_round(fed, state, Schedule(cfg).clients(round_no), outcomes, round_no, evaluate=False)
    return save_state(out, closed.state, {"kind": "global", "round": round_no}), closed.record


def evaluate_step(cfg: Config, model: str | Path, out: str | Path | None = None, probe: bool = False,
                  split: str = "test") -> Evaluation:
    """Evaluate a model file on ``split`` (test by default); writes the metrics (and the confusion matrix)
    as JSON. Needs the prepared data and the model, not the partition."""
    use_threads(cfg.threads)
    data = DataModule(cfg.data.prepared_dir)
    device = resolve_device(cfg.device)
    net = load_model(cfg, model, data).to(device)
    ev = evaluate_model(net, data, cfg.evaluation.batch_size, device, probe=probe, split=split,
                        missing_modality=cfg.evaluation.missing_modality, seed=cfg.seed,
                        absent_rates=cfg.evaluation.absent_rates)
    if out is not None:
        write_metrics(out, ev, confusion=True)
    return ev
