"""The strategy interface: one algorithm, one file.

A strategy declares its settings (:attr:`Strategy.Options`, found at
``algorithm.<section>`` in params), the shared algorithm settings it reads,
the network it trains, how a client trains, and which clients average each
parameter (:attr:`Strategy.aggregation`, what ``algorithm.aggregation: auto``
takes). A module of this package holding a subclass with a ``name`` is
registered (:data:`fedcmi.registry.ALGORITHMS`), and nothing else branches on
its name. A strategy never owns data or files: the engine (or a Kubeflow
component) loads the global state into a model, hands it a
:class:`ClientContext` and gets a :class:`ClientUpdate` back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from fedcmi.algorithms.losses import proximal_term
from fedcmi.config import Config
from fedcmi.models.networks import FusionNet, MultimodalNet
from fedcmi.privacy.dp_sgd import PrivateGradients
from fedcmi.round.update import ClientUpdate, StateDict
from fedcmi.seeds import derive_seed

if TYPE_CHECKING:
    from fedcmi.data.base import DatasetSpec

OptionsT = TypeVar("OptionsT", bound=BaseModel)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass
class ClientContext:
    """Everything one client's local training needs besides the model."""

    cfg: Config
    #: the round, from 1
    round_no: int
    client_id: int
    modalities: tuple[str, ...]
    num_examples: int
    batches: Callable[[int], Iterable[Batch]]  # epoch -> shuffled batches of this client's data
    device: torch.device
    #: SCAFFOLD's (c, c_i) by parameter name when ``algorithm.control_variates`` is on; :func:`local_sgd`
    #: corrects every step by c - c_i and leaves the client's new c_i in :attr:`control_out`.
    control: tuple[StateDict, StateDict] | None = None
    control_out: StateDict | None = None
    #: DP-SGD's Poisson draws of an epoch (``privacy.dp_sgd``), in place of :attr:`batches`; None for an
    #: empty draw
    private_batches: Callable[[int], Iterable[Batch | None]] | None = None

    @property
    def rounds_done(self) -> int:
        """Rounds the federation completed before this one (what warm-ups, decays and seeds count)."""
        return self.round_no - 1

    @property
    def seed(self) -> int:
        return derive_seed(self.cfg.seed, self.rounds_done, self.client_id)

    @property
    def lr(self) -> float:
        o = self.cfg.optim
        return o.lr * o.lr_decay ** (self.rounds_done // o.lr_decay_every)

    def device_batches(self, epoch: int) -> Generator[Batch, None, None]:
        """The epoch's batches on the device."""
        for batch in self.batches(epoch):
            yield self._to_device(batch)

    def device_draws(self, epoch: int) -> Iterator[Batch | None]:
        """The epoch's steps on the device: DP-SGD's Poisson draws when it is on (None for an empty draw),
        else the batches."""
        source = self.private_batches if self.private_batches is not None else self.batches
        for batch in source(epoch):
            yield None if batch is None else self._to_device(batch)

    def _to_device(self, batch: Batch) -> Batch:
        asynchronous = self.cfg.loader.pinned(self.device.type)  # non_blocking only helps from pinned memory
        x, y = batch
        return ({m: v.to(self.device, non_blocking=asynchronous) for m, v in x.items()},
                y.to(self.device, non_blocking=asynchronous))


LossFn = Callable[[MultimodalNet, dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
GradHook = Callable[[MultimodalNet, dict[str, float]], None]


def local_sgd(
    model: MultimodalNet,
    ctx: ClientContext,
    loss_fn: LossFn,
    mu: float = 0.0,
    grad_hook: GradHook | None = None,
) -> dict[str, float]:
    """Run ``local_epochs`` of SGD on ``model`` in place; returns mean loss terms.

    With ``optim.precision`` mixed, the forward pass and the loss run under
    autocast (bfloat16 or float16; float16 with loss scaling). A ``grad_hook``
    always sees unscaled gradients. At precision 32 both are off.

    With ``privacy.dp_sgd`` the batches are Poisson draws and each step's gradient is DP-SGD's (clipped per
    example, noised); FedProx's pull and SCAFFOLD's correction, which read no data, are added after.
    """
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = {n: p.detach().clone() for n, p in params} if mu > 0 else {}
    private = PrivateGradients(model, ctx.cfg, ctx.num_examples, ctx.seed, ctx.device) \
        if ctx.private_batches is not None else None
    try:
        return _steps(model, ctx, loss_fn, mu, grad_hook, params, anchor, private)
    finally:
        if private is not None:
            private.close()


def _steps(model: MultimodalNet, ctx: ClientContext, loss_fn: LossFn, mu: float, grad_hook: GradHook | None,
           params: list[tuple[str, torch.nn.Parameter]], anchor: dict[str, torch.Tensor],
           private: PrivateGradients | None) -> dict[str, float]:
    o = ctx.cfg.optim
    drift = _Drift(model, ctx) if ctx.control is not None else None
    opt = torch.optim.SGD([p for _, p in params], lr=ctx.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    mixed = o.precision != "32"
    half = torch.bfloat16 if o.precision == "bf16-mixed" else torch.float16
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=o.precision == "16-mixed")
    totals: dict[str, float] = {}
    steps = data_steps = 0

    def finish_step(terms: dict[str, float]) -> None:
        nonlocal steps
        if private is not None and mu > 0:  # the pull toward the global model reads no data: added unclipped
            for name, p in params:
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor[name], alpha=mu)
        if grad_hook is not None or drift is not None:
            scaler.unscale_(opt)
        if grad_hook is not None:
            grad_hook(model, terms)
        if drift is not None:
            drift.correct(params)
        scaler.step(opt)
        scaler.update()
        steps += 1

    def noise_step(epoch: int) -> None:
        assert private is not None
        if private.reached is None:  # no step with data yet: which parameters one would reach is not known
            _find_reached(model, loss_fn, ctx, epoch, params, private)
        opt.zero_grad(set_to_none=True)
        private.noise_only(params)
        finish_step({})

    for epoch in range(ctx.cfg.federation.local_epochs):
        for batch in ctx.device_draws(epoch):
            if batch is None:  # an empty Poisson draw: a step of noise alone, as the accountant counts it
                noise_step(epoch)
                continue
            x, y = batch
            if private is not None:
                private.begin()
            with torch.autocast(ctx.device.type, dtype=half, enabled=mixed):
                loss, terms = loss_fn(model, x, y)
            prox = None
            if mu > 0:
                prox = proximal_term(params, anchor, mu)
                terms["prox"] = prox.item()
                if private is None:
                    loss = loss + prox
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if private is not None:
                private.privatize(params, len(y))
                loss = loss + prox if prox is not None else loss
            finish_step(terms)
            terms["loss"] = loss.item()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            data_steps += 1
    out = {k: v / max(data_steps, 1) for k, v in totals.items()}
    out["steps"] = steps
    if drift is not None:
        ctx.control_out = drift.new_control(model, steps, ctx.lr / (1.0 - o.momentum))
    return out


def _find_reached(model: MultimodalNet, loss_fn: LossFn, ctx: ClientContext, epoch: int,
                  params: list[tuple[str, torch.nn.Parameter]], private: PrivateGradients) -> None:
    """Which parameters a step's loss reaches, from a backward pass on one of the client's plain batches whose
    gradients are dropped: which they are depends on the network, the client's modalities and the loss,
    never on the values of the data, so no example's values reach the update."""
    batches = ctx.device_batches(epoch)
    try:
        x, y = next(batches)
    finally:
        batches.close()
    private.begin()
    loss, _ = loss_fn(model, x, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    private.learn(params)


class _Drift:
    """SCAFFOLD's client side (Karimireddy et al., ICML 2020): every local step's gradient gets
    ``c - c_i``; after K steps at learning rate lr the client's new variate is (option II)
    ``c_i+ = c_i - c + (x - y) / (K lr_eff)``. The paper's clients take plain SGD steps (lr_eff = lr);
    ours keep ``optim.momentum`` m, whose steady step is lr / (1 - m) times the gradient, so
    lr_eff = lr / (1 - m): dividing by lr alone would make c_i 1 / (1 - m) times the mean gradient (10x
    at 0.9), and the correction would throw the clients off. A parameter the client never trained (the
    other modality's encoder on a single-modality client) keeps its ``c_i`` and gets no correction."""

    def __init__(self, model: MultimodalNet, ctx: ClientContext) -> None:
        assert ctx.control is not None
        c, ci = ctx.control
        named = dict(model.named_parameters())
        self.start = {n: p.detach().to("cpu", torch.float64, copy=True) for n, p in named.items()}
        self.c = {n: c[n].double().expand(p.shape) for n, p in self.start.items()}
        self.ci = {n: ci[n].double().expand(p.shape) for n, p in self.start.items()}
        self.correction = {n: (self.c[n] - self.ci[n]).to(named[n].device, named[n].dtype) for n in named}
        self.touched: set[str] = set()

    def correct(self, params: list[tuple[str, torch.nn.Parameter]]) -> None:
        for name, p in params:
            if p.grad is not None:
                p.grad.add_(self.correction[name])
                self.touched.add(name)

    def new_control(self, model: MultimodalNet, steps: int, lr: float) -> StateDict:
        out: StateDict = {}
        for name, p in model.named_parameters():
            if name in self.touched and steps > 0:
                y = p.detach().to("cpu", torch.float64)
                out[name] = self.ci[name] - self.c[name] + (self.start[name] - y) / (steps * lr)
            else:
                out[name] = self.ci[name].clone(memory_format=torch.contiguous_format)
        return out


def snapshot(model: MultimodalNet) -> StateDict:
    """A CPU copy of the model's state, fit to send to the server."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Strategy(ABC):
    """One federated algorithm: its settings, its network, how a client trains, how the server aggregates."""

    #: ``algorithm.name`` of this algorithm.
    name: ClassVar[str] = ""
    #: Its own settings (a pydantic model), at ``algorithm.<section>``; None when it has none.
    Options: ClassVar[type[BaseModel] | None] = None
    #: Where :attr:`Options` live under ``algorithm`` (default: :attr:`name`).
    section: ClassVar[str | None] = None
    #: The shared ``algorithm`` settings it reads besides ``name`` and ``aggregation`` (``mu``, ``modality``).
    reads: ClassVar[tuple[str, ...]] = ()
    #: Which clients average each parameter under ``algorithm.aggregation: auto``: every client (plain), or
    #: a modality's parameters only the clients holding it (modality_aware).
    aggregation: ClassVar[Literal["plain", "modality_aware"]] = "plain"
    #: The server step ``server.optimizer: auto`` means for it (FedAvgM and FedAdam have their own).
    server_optimizer: ClassVar[Literal["none", "momentum", "adam"]] = "none"
    #: Whether ``algorithm.control_variates: auto`` turns SCAFFOLD's correction on (scaffold only).
    control_variates: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def options_key(cls) -> str | None:
        return (cls.section or cls.name) if cls.Options is not None else None

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise ValueError (naming the field) when ``cfg`` cannot run this algorithm."""
        return None  # most algorithms run under any valid config

    @classmethod
    def build_network(cls, cfg: Config, spec: DatasetSpec) -> MultimodalNet:
        """The network it trains (built under the caller's seed): the plain fusion network by default."""
        m = cfg.model
        return FusionNet(spec.modalities, spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width, m.fusion,
                         spec.vocab_sizes)

    @classmethod
    def per_sample_obstacle(cls, cfg: Config) -> str | None:
        """Why DP-SGD cannot bound one example's influence on this method's local training under ``cfg``
        (its loss couples examples), or None when the loss is a sum of per-example terms."""
        return None

    def options(self, cls: type[OptionsT]) -> OptionsT:
        """This algorithm's validated settings."""
        return self.cfg.algorithm.options(cls)

    def participates(self, modalities: Sequence[str]) -> bool:
        """Whether a client holding ``modalities`` has anything to train."""
        return True

    def batch_modalities(self, modalities: Sequence[str]) -> tuple[str, ...]:
        """Which of the client's modalities its batches carry."""
        return tuple(modalities)

    @abstractmethod
    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        """Train ``model`` (holding the global state) on one client; return its update."""

    def train_summary(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """The round's training figures: the mean of each number the admitted clients reported (loss and
        its terms), by name."""
        if not updates:
            return {}
        keys = sorted({k for u in updates for k, v in u.metrics.items() if isinstance(v, (int, float))})
        out = {}
        for k in keys:
            vals = [u.metrics[k] for u in updates if isinstance(u.metrics.get(k), (int, float))]
            out[k] = float(np.mean(vals))
        return out

    def algorithm_summary(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """The algorithm's own figures for the round (none by default), by name."""
        return {}


def cross_entropy(model: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The multimodal head's cross-entropy: the loss of FedAvg and of the methods built on it."""
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x).mm_logits, y)
    return loss, {"ce": loss.item()}
