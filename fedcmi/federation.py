"""One federated round, as the same functions for every runner.

:class:`Federation` binds a config, the prepared data, the partition and a
strategy to one reusable model instance. Its methods are the round's parts:
sample clients, train one client, aggregate, evaluate. The in-process engine
calls them in a loop; the file-to-file steps (and so the Kubeflow components)
call them one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch

from fedcmi.algorithms import ClientContext, ClientUpdate, Strategy, get_strategy
from fedcmi.algorithms.aggregation import StateDict, model_state, split_state
from fedcmi.algorithms.base import derive_seed
from fedcmi.algorithms.server_step import client_control
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.evaluation import EvalResult, evaluate_model
from fedcmi.models import build_model
from fedcmi.partition import Partition
from fedcmi.rounds import Producer, RoundDiverged, RoundFailed, RoundPolicy, RoundResult, sample_clients

if TYPE_CHECKING:
    from fedcmi.workers import ClientWorkers

__all__ = ["Federation", "RoundDiverged", "RoundFailed", "RoundResult", "resolve_device", "sample_clients"]

log = logging.getLogger("fedcmi")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def use_threads(n: int) -> int:
    """Give torch ``n`` intra-op threads (0: leave its count as it is, by default one per core); returns the count.

    The count is part of a run's identity: reductions split differently over threads, so the same seed
    gives a different model with another count. A fixed default (1) keeps results equal across machines
    of one kind, and small multimodal models gain little from a second thread while a shared machine's
    other jobs make every extra one wait.
    """
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class Federation:
    """The parts of a round over one model instance (memory does not grow with clients)."""

    def __init__(self, cfg: Config, data: DataModule, partition: Partition, device: torch.device | None = None) -> None:
        if partition.num_samples != len(data.train):
            raise ValueError(
                f"the partition covers {partition.num_samples} samples but the prepared train split has "
                f"{len(data.train)}; rerun `fedcmi partition`"
            )
        if len(partition.clients) != cfg.partition.num_clients:
            raise ValueError(
                f"the partition file has {len(partition.clients)} clients, params say partition.num_clients="
                f"{cfg.partition.num_clients}; rerun `fedcmi partition`"
            )
        self.cfg = cfg
        self.data = data
        self.partition = partition
        use_threads(cfg.threads)
        self.device = device or resolve_device(cfg.device)
        self.strategy: Strategy = get_strategy(cfg)
        self.model = build_model(cfg, data.spec).to(self.device)
        self.faults = partition.sample_faults(data.train.labels)  # the partition's faulty samples, if any

    @property
    def policy(self) -> RoundPolicy:
        return RoundPolicy(self.cfg)

    # -- state ---------------------------------------------------------------
    def initial_state(self) -> StateDict:
        """The seeded initial global model (a fresh build, not the working instance)."""
        return {k: v.detach().cpu().clone() for k, v in build_model(self.cfg, self.data.spec).state_dict().items()}

    def load(self, state: StateDict) -> None:
        """Load the model's part of a federation state (the server's ``aux/`` state stays out of it)."""
        self.model.load_state_dict(model_state(state), strict=True)

    # -- the round's parts ---------------------------------------------------------
    def sample_clients(self, rnd: int) -> list[int]:
        return self.policy.clients(rnd)

    def client_context(self, cid: int, rnd: int) -> ClientContext | None:
        shard = self.partition.client(cid)
        if not self.strategy.participates(shard.modalities):
            return None
        mods = self.strategy.batch_modalities(shard.modalities)
        bs = self.cfg.federation.batch_size
        seed = self.cfg.seed

        loader = self.cfg.loader
        pin = loader.pinned(self.device.type)

        indices = shard.labelled

        def batches(epoch: int):
            return self.data.client_batches(indices, mods, bs, derive_seed(seed, rnd, cid, epoch),
                                            loader.workers, pin, self.faults)

        return ClientContext(self.cfg, rnd, cid, shard.modalities, shard.num_examples, batches, self.device)

    def train_client(self, global_state: StateDict, cid: int, rnd: int) -> ClientUpdate | None:
        """One client's local training from ``global_state``; None if it has nothing to train."""
        ctx = self.client_context(cid, rnd)
        if ctx is None:
            return None
        self.load(global_state)
        if self.cfg.control_variates:
            names = [n for n, _ in self.model.named_parameters()]
            ctx.control = client_control(split_state(global_state)[1], cid, names)
        torch.manual_seed(ctx.seed)
        update = self.strategy.train_client(self.model, ctx)
        if ctx.control_out is not None:
            update.extra = ctx.control_out
        return update

    def aggregate(self, global_state: StateDict, updates: Iterable[ClientUpdate], rnd: int) -> RoundResult:
        """Check and fold the updates in client order; fail the round below ``min_clients``."""
        ordered = sorted(updates, key=lambda u: u.client_id)
        return self._fold(global_state, ((u.client_id, lambda u=u: u) for u in ordered), rnd)

    def aggregate_outcomes(self, global_state: StateDict, outcomes: Iterable[tuple[int, Producer]],
                           rnd: int) -> RoundResult:
        """Fold (client id, producer) pairs, sorted by client id: the outcomes of a round read from files."""
        return self._fold(global_state, sorted(outcomes, key=lambda t: t[0]), rnd)

    def outcomes(self, global_state: StateDict, clients: list[int], rnd: int,
                 workers: ClientWorkers | None = None) -> Iterator[tuple[int, Producer]]:
        """(client id, producer) for ``clients`` in that order: trained here one by one when ``workers`` is
        None, else trained ahead by the worker processes. Either way the same updates, bitwise."""
        if workers is not None:
            return workers.outcomes(global_state, clients, rnd)
        return ((cid, partial(self.train_client, global_state, cid, rnd)) for cid in clients)

    def run_round(self, global_state: StateDict, rnd: int, workers: ClientWorkers | None = None) -> RoundResult:
        """Sample, train the clients (here, or in ``workers``), fold their updates in client order as they
        arrive (memory holds a few updates, whatever the number of clients)."""
        clients = self.sample_clients(rnd)
        res = self._fold(global_state, self.outcomes(global_state, clients, rnd, workers), rnd)
        res.clients = clients
        return res

    def _fold(self, global_state: StateDict, producers, rnd: int) -> RoundResult:
        return self.policy.conclude(self.strategy, self.model, global_state, producers, rnd, self.partition)

    def evaluate(self, state: StateDict, probe: bool = False, split: str = "test") -> EvalResult:
        self.load(state)
        return evaluate_model(self.model, self.data, self.cfg.evaluation.batch_size, self.device, probe=probe,
                              missing_modality=self.cfg.evaluation.missing_modality, seed=self.cfg.seed,
                              split=split)
