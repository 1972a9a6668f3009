"""Sample-level differential privacy inside a client's local training: DP-SGD (Abadi et al., "Deep Learning
with Differential Privacy", CCS 2016), with per-example gradients from Opacus.

Each step's batch is drawn by Poisson sampling (:func:`poisson_steps`); Opacus's ``GradSampleModule`` hooks
the network's layers so one backward pass gives every example's gradient; :class:`PrivateGradients` clips
each example's gradient (over all the parameters it reaches) to ``max_grad_norm``, sums them, adds Gaussian
noise of std ``noise_multiplier x max_grad_norm`` from the client's seeded generator and divides by the
expected batch size. Opacus's ``DPOptimizer`` does the same clip and noise, but replaces every trainable
parameter's gradient, so FedProx's proximal pull and SCAFFOLD's correction (data-free, added after the
noise here) would be lost; and a single-modality client's idle encoder, which has no per-example gradient,
would stop it. A gradient that reaches a parameter without passing a hooked layer is refused, never
released unclipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedcmi.config import Config
from fedcmi.errors import FedcmiError
from fedcmi.seeds import derive_seed

DP_SGD_STREAM = 0xD95D  # the noise of a client's steps
POISSON_STREAM = 0x9015  # its Poisson batches


class UnclippedGradient(FedcmiError, RuntimeError):
    """A gradient that reached a parameter outside Opacus's per-example hooks: it cannot be clipped."""


def sampling(cfg: Config, num_examples: int) -> tuple[float, int]:
    """A client's Poisson rate (``batch_size`` / its examples, at most 1) and steps per local epoch."""
    q = min(1.0, cfg.federation.batch_size / max(num_examples, 1))
    return q, max(1, round(1 / q))


def poisson_steps(cfg: Config, indices: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """One local epoch's draws of ``indices``: each step takes every example with the client's rate, from
    a generator of ``seed``. A draw may be empty: that step still releases noise (the accountant counts
    every step, and skipping one would tell that no example was drawn)."""
    q, steps = sampling(cfg, len(indices))
    rng = np.random.default_rng(derive_seed(seed, POISSON_STREAM))
    for _ in range(steps):
        yield indices[rng.random(len(indices)) < q]


class PrivateGradients:
    """Per-example gradients of ``model`` (Opacus's hooks, while open), clipped, summed and noised."""

    def __init__(self, model: torch.nn.Module, cfg: Config, num_examples: int, seed: int,
                 device: torch.device) -> None:
        from opacus import GradSampleModule

        dp = cfg.privacy.dp_sgd
        self.bound = dp.max_grad_norm
        self.std = dp.noise_multiplier * dp.max_grad_norm
        q, _ = sampling(cfg, num_examples)
        self.expected = q * num_examples
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(seed, DP_SGD_STREAM))
        self.model = model
        #: the parameters a step's loss reaches (known after the first step, or from a probe): an empty draw's
        #: noise goes to these, as a step with data would give them
        self.reached: list[str] | None = None
        # the first layer's hook fires on a batch that needs no gradient; the per-example weights are right
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        # strict: a layer Opacus cannot take per-example gradients of (batch norm) is an error here
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)

    def begin(self) -> None:
        """Forget what the last step left in the hooks. A forward pass runs layers whose output the loss may
        not read (the unimodal heads under FedAvg's loss): their inputs stay captured, and would be taken
        for the next step's."""
        for m in self.model.modules():
            if hasattr(m, "activations"):
                setattr(m, "activations", [])  # noqa: B010 (Opacus's own attribute, untyped)
            if hasattr(m, "max_batch_len"):
                del m.max_batch_len
        for p in self.model.parameters():
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            p.grad_sample = None  # type: ignore[attr-defined]

    def privatize(self, params: Sequence[tuple[str, torch.nn.Parameter]], batch: int) -> None:
        """Replace each parameter's gradient by the clipped, summed, noised per-example gradients over the
        expected batch size. Call after ``backward`` of a batch of ``batch`` examples' mean loss."""
        for name, m in self.model.named_modules():
            # a layer that ran twice with only one run reaching the loss: which input was its gradient's is
            # unknown (Opacus pairs them last in, first out), so its per-example gradients may be wrong
            if getattr(m, "activations", None) and any(p.grad is not None for p in m.parameters(recurse=False)):
                raise UnclippedGradient(f"layer {name} ran more often than its output reached the loss, so its "
                                        "per-example gradients cannot be told apart; DP-SGD cannot train this loss")
        reached = self._reached(params)
        stray = [n for n, p in params if p.grad is not None and getattr(p, "grad_sample", None) is None]
        if stray:
            raise UnclippedGradient(f"the gradient of {stray[0]} did not pass a layer Opacus computes per-example "
                                    "gradients of, so it cannot be clipped; DP-SGD cannot train this network")
        self.reached = [n for n, _ in reached]
        if not reached:
            return
        samples = {n: self._per_example(n, p.grad_sample, batch) for n, p in reached}  # type: ignore[attr-defined]
        norms = torch.cat([g.reshape(batch, -1) for g in samples.values()], dim=1).norm(2, dim=1)
        factor = (self.bound / (norms + 1e-6)).clamp(max=1.0)
        for n, p in reached:
            gs = samples[n]
            summed = torch.einsum("i,i...->...", factor.to(gs.dtype), gs)
            p.grad = (summed + self._noise(p).to(gs.dtype)) / self.expected
            p.grad_sample = None  # type: ignore[attr-defined]

    def learn(self, params: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """Take the parameters a step reaches from a backward pass made only to find them (an empty draw
        came before any step with data), and drop that pass's gradients."""
        self.reached = [n for n, _ in self._reached(params)]
        for _, p in params:
            p.grad = None
        self.begin()

    def noise_only(self, params: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """An empty draw's step: the reached parameters' gradient is the noise alone over the expected batch
        size (the sum of no clipped gradients), from the same generator in the same order as a step with
        data; the others get none."""
        if self.reached is None:
            raise RuntimeError("noise_only before the reached parameters are known")
        reached = set(self.reached)
        for n, p in params:
            p.grad = self._noise(p).to(p.dtype) / self.expected if n in reached else None

    def _noise(self, p: torch.nn.Parameter) -> torch.Tensor:
        """One step's Gaussian noise for ``p`` (std ``noise_multiplier x max_grad_norm``), from the client's
        seeded generator."""
        return torch.normal(0.0, self.std, size=p.shape, generator=self.generator, device=p.device)

    @staticmethod
    def _reached(params: Sequence[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters the last backward pass reached through Opacus's hooks."""
        return [(n, p) for n, p in params if getattr(p, "grad_sample", None) is not None]

    @staticmethod
    def _per_example(name: str, gs: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-example gradients from Opacus's per-row ones. A frame encoder runs on the batch's B x T frames
        (example-major, as ``x.reshape(B * T, ...)`` lays them out): Opacus then takes every frame for an
        example and scales each by B x T instead of B; an example's gradient is its T rows' mean."""
        rows = gs.shape[0]
        if rows == batch:
            return gs
        if rows % batch:
            raise UnclippedGradient(f"the per-example gradients of {name} come in {rows} rows for a batch of "
                                    f"{batch}: they cannot be told apart by example")
        return gs.reshape(batch, rows // batch, *gs.shape[1:]).mean(dim=1)

    def close(self) -> None:
        """Remove the hooks: the model is trained by other clients next, without them."""
        self.module._close()
