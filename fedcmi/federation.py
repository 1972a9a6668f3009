"""One federation's parts over one model instance: the settings, the prepared data, the partition, the
algorithm, and the model its clients train.

:class:`Federation` trains one client from a global state and evaluates a state; everything else about a
round (sampling, the server pipeline, the record, the commit) is in :mod:`fedcmi.round`, used the same way
by every executor. Memory does not grow with the clients: one model instance serves them all in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from fedcmi.algorithms import build_model, get_strategy
from fedcmi.algorithms.base import Batch, ClientContext, Strategy
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.data.base import ResidentLoader
from fedcmi.errors import FedcmiError
from fedcmi.evaluation import evaluate_model
from fedcmi.metrics import Evaluation
from fedcmi.partition import Partition, PartitionError
from fedcmi.privacy.dp_sgd import poisson_steps
from fedcmi.round.client_state import client_control
from fedcmi.round.update import ClientUpdate, StateDict, model_state, split_state
from fedcmi.seeds import derive_seed

__all__ = ["DeviceError", "Federation", "resolve_device", "use_threads"]

log = logging.getLogger("fedcmi")


class DeviceError(FedcmiError, RuntimeError):
    """A device the settings ask for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: cuda was asked for, but no CUDA device is available")
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


def check_inputs(cfg: Config, data: DataModule | None, partition: Partition) -> None:
    """A :class:`PartitionError` when the partition file was not made from this data (when given) with these
    settings."""
    if data is not None and partition.num_samples != len(data.train):
        raise PartitionError(
            f"the partition covers {partition.num_samples} samples but the prepared train split has "
            f"{len(data.train)}; rerun `fedcmi partition`"
        )
    if len(partition.clients) != cfg.partition.num_clients:
        raise PartitionError(
            f"the partition file has {len(partition.clients)} clients, params say partition.num_clients="
            f"{cfg.partition.num_clients}; rerun `fedcmi partition`"
        )
    if cfg.privacy.mechanism != "none":  # a run past its privacy budget is refused before anything trains
        from fedcmi.privacy.accounting import accountant, model_groups

        groups = None
        if data is not None:  # the model's own groups, as the rounds will account them
            groups = model_groups(cfg, build_model(cfg, data.spec))
        accountant(cfg, [c.modalities for c in partition.clients], groups)


class Federation:
    """The parts of a round over one model instance (memory does not grow with clients)."""

    def __init__(self, cfg: Config, data: DataModule, partition: Partition, device: torch.device | None = None) -> None:
        check_inputs(cfg, data, partition)
        self.cfg = cfg
        self.data = data
        self.partition = partition
        use_threads(cfg.threads)
        self.device = device or resolve_device(cfg.device)
        self.strategy: Strategy = get_strategy(cfg)
        self.model = build_model(cfg, data.spec).to(self.device)
        self.faults = partition.sample_faults(data.train.labels)  # the partition's faulty samples, if any
        self._loader: ResidentLoader | None = None

    @property
    def loader(self) -> ResidentLoader:
        """The training split's loader for every client this instance trains, made on first use (an
        evaluation-only federation starts no loader workers)."""
        if self._loader is None:
            cfg = self.cfg.loader
            self._loader = self.data.client_loader(cfg.workers, cfg.pinned(self.device.type), self.faults)
        return self._loader

    # -- state ---------------------------------------------------------------
    def initial_state(self) -> StateDict:
        """The seeded initial global model (a fresh build, not the working instance)."""
        return {k: v.detach().cpu().clone() for k, v in build_model(self.cfg, self.data.spec).state_dict().items()}

    def load(self, state: StateDict) -> None:
        """Load the model's part of a federation state (the server's ``aux/`` state stays out of it)."""
        self.model.load_state_dict(model_state(state), strict=True)

    # -- one client ----------------------------------------------------------------
    def client_context(self, cid: int, round_no: int) -> ClientContext | None:
        shard = self.partition.client(cid)
        if not self.strategy.participates(shard.modalities):
            return None
        mods = self.strategy.batch_modalities(shard.modalities)
        bs = self.cfg.federation.batch_size
        seed = self.cfg.seed
        indices = shard.labelled
        done = round_no - 1  # seeds count the rounds before this one

        def batches(epoch: int):
            return self.loader.batches(indices, mods, bs, derive_seed(seed, done, cid, epoch))

        def poisson(epoch: int) -> Iterator[Batch | None]:  # DP-SGD's draws: one loader request per step
            for pick in poisson_steps(self.cfg, indices, derive_seed(seed, done, cid, epoch)):
                if len(pick):
                    yield from self.loader.batches(pick, mods, len(pick), None)
                else:
                    yield None

        private = poisson if self.cfg.privacy.dp_sgd.enabled else None
        return ClientContext(self.cfg, round_no, cid, shard.modalities, shard.num_examples, batches, self.device,
                             private_batches=private)

    def train_client(self, global_state: StateDict, cid: int, round_no: int) -> ClientUpdate | None:
        """Client ``cid``'s local training in round ``round_no`` from ``global_state``; None if it has
        nothing to train."""
        ctx = self.client_context(cid, round_no)
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

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self, state: StateDict, probe: bool = False, split: str = "test") -> Evaluation:
        self.load(state)
        return evaluate_model(self.model, self.data, self.cfg.evaluation.batch_size, self.device, probe=probe,
                              missing_modality=self.cfg.evaluation.missing_modality, seed=self.cfg.seed,
                              split=split, absent_rates=self.cfg.evaluation.absent_rates)
