"""The FedCMI network and the plain fusion network the baselines train.

Parameter names say which modality owns them (``encoders.<m>.``,
``self_proj.<m>.``, ``inf_proj.<m>.``, ``classifiers.<m>.``); everything else
(the fusion head) is shared. :meth:`owner` reads that, and the modality-aware
aggregation relies on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedcmi.models.encoders import build_encoder
from fedcmi.models.fusion import build_fusion

_OWNED = ("encoders", "self_proj", "inf_proj", "classifiers", "teachers")


def _projector(kind: str, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, dim)
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


@dataclass
class Output:
    """What one forward pass gives the losses."""

    mm_logits: torch.Tensor
    uni_logits: Mapping[str, torch.Tensor] = field(default_factory=dict)
    h: dict[str, torch.Tensor] = field(default_factory=dict)
    z_self: dict[str, torch.Tensor] = field(default_factory=dict)
    z_inf: dict[str, torch.Tensor] = field(default_factory=dict)


class OnDemand(Mapping[str, torch.Tensor]):
    """Logits per modality, each computed the first time it is read. A loss that never reads them (FedAvg's
    reads the fused logits only) runs no layer for them: DP-SGD's per-example hooks then see each layer run
    once per step, as many times as its output reaches the loss."""

    def __init__(self, keys: Sequence[str], compute: Callable[[str], torch.Tensor]) -> None:
        self._keys = tuple(keys)
        self._compute = compute
        self._done: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._done:
            self._done[key] = self._compute(key)
        return self._done[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MultimodalNet(nn.Module):
    """What every network a strategy trains offers: its modalities, an encoder per modality, which
    modality owns a parameter, a forward pass to :class:`Output` and the evaluation's views."""

    modalities: tuple[str, ...]
    encoders: nn.ModuleDict
    num_classes: int
    #: How the network answers when a modality is absent (what the served model reports as ``path_kind``).
    absent_modality: str = "own forward"

    if TYPE_CHECKING:  # nn.Module.__call__ runs forward; this tells the type checker what it returns
        def __call__(self, x: dict[str, torch.Tensor]) -> Output: ...

    def owner(self, name: str) -> str | None:
        """The modality a parameter belongs to, or None for shared ones."""
        parts = name.split(".")
        if parts[0] in _OWNED and len(parts) > 1 and parts[1] in self.modalities:
            return parts[1]
        return None

    def encode(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](x[m]) for m in self.modalities if m in x}

    def forward(self, x: dict[str, torch.Tensor]) -> Output:
        raise NotImplementedError

    def eval_logits(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every view the evaluation reports (``mm``, ``uni/<m>``, ``path/<m>``), from one batch."""
        raise NotImplementedError


def uni_modal_views(out: Output) -> dict[str, torch.Tensor]:
    """The evaluation's views of a network whose modality-only prediction is its uni-modal read-out:
    ``mm``, and ``uni/<m>`` = ``path/<m>`` for each modality."""
    logits = {"mm": out.mm_logits}
    for m, lg in out.uni_logits.items():
        logits[f"uni/{m}"] = lg
        logits[f"path/{m}"] = lg
    return logits


class FedCMINet(MultimodalNet):
    """Encoders, self and infiltration projectors, a classifier per modality, fusion.

    Fan et al., "Balanced Multi-modal Federated Learning via Cross-Modal
    Infiltration", arXiv 2401.00894. Slot 0 of the fusion head is always the
    first modality, slot 1 the second; a missing modality's slot is filled by
    the present one's infiltration features.
    """

    absent_modality = "infiltration"

    def __init__(
        self,
        modalities: tuple[str, str],
        shapes: dict[str, tuple[int, ...]],
        encoders: Mapping[str, str],
        num_classes: int,
        dim: int,
        width: int,
        projector: str = "linear",
        projectors: str = "two",
        fusion: str = "concat",
        vocab_sizes: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.shared_projector = projectors == "one"
        vocab = vocab_sizes or {}
        self.encoders = nn.ModuleDict({m: build_encoder(encoders[m], shapes[m], dim, width, m, vocab.get(m))
                                       for m in modalities})
        self.self_proj = nn.ModuleDict({m: _projector(projector, dim) for m in modalities})
        if not self.shared_projector:
            self.inf_proj = nn.ModuleDict({m: _projector(projector, dim) for m in modalities})
        self.classifiers = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in modalities})
        self.fusion = build_fusion(fusion, dim, num_classes)

    def infiltrate(self, m: str, h: torch.Tensor) -> torch.Tensor:
        """z_mn = I_m(h_m): m's features that take in the other modality's knowledge."""
        return self.self_proj[m](h) if self.shared_projector else self.inf_proj[m](h)

    def fuse(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self.modalities
        return self.fusion(z[a], z[b])

    def forward(self, x: dict[str, torch.Tensor]) -> Output:
        h = self.encode(x)
        if not h:
            raise ValueError(f"batch holds none of the modalities {self.modalities}")
        z_self = {m: self.self_proj[m](hm) for m, hm in h.items()}
        z_inf = {m: self.infiltrate(m, hm) for m, hm in h.items()}
        uni = {m: self.classifiers[m](z) for m, z in z_self.items()}
        slots = dict(z_self)
        if len(h) == 1:
            (m,) = h
            other = self.modalities[1] if m == self.modalities[0] else self.modalities[0]
            slots[other] = z_inf[m]
        return Output(self.fuse(slots), uni, h, z_self, z_inf)

    @torch.no_grad()
    def eval_logits(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every view the evaluation reports, from one batch holding both modalities."""
        out = self.forward(x)
        a, b = self.modalities
        logits = {"mm": out.mm_logits}
        for m in self.modalities:
            logits[f"uni/{m}"] = out.uni_logits[m]
        logits[f"path/{a}"] = self.fusion(out.z_self[a], out.z_inf[a])
        logits[f"path/{b}"] = self.fusion(out.z_inf[b], out.z_self[b])
        return logits


class FusionNet(MultimodalNet):
    """Encoders and a fusion head, nothing else: the model FedAvg, FedProx and OGM-GE train.

    With one modality it is that modality's encoder and a linear classifier
    (single-modality FedAvg). A missing modality's slot is zero-filled; the
    uni-modal read-out of m is the fusion head with the other slot zero.
    """

    absent_modality = "zero-filled fusion"

    def __init__(
        self,
        modalities: tuple[str, ...],
        shapes: dict[str, tuple[int, ...]],
        encoders: Mapping[str, str],
        num_classes: int,
        dim: int,
        width: int,
        fusion: str = "concat",
        vocab_sizes: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.dim = dim
        vocab = vocab_sizes or {}
        self.encoders = nn.ModuleDict({m: build_encoder(encoders[m], shapes[m], dim, width, m, vocab.get(m))
                                       for m in modalities})
        if len(self.modalities) == 1:
            self.head: nn.Module = nn.Linear(dim, num_classes)
        else:
            self.fusion = build_fusion(fusion, dim, num_classes)

    def _fuse(self, h: dict[str, torch.Tensor]) -> torch.Tensor:
        if len(self.modalities) == 1:
            return self.head(h[self.modalities[0]])
        a, b = self.modalities
        ref = h[a] if a in h else h[b]
        za = h.get(a, torch.zeros_like(ref))
        zb = h.get(b, torch.zeros_like(ref))
        return self.fusion(za, zb)

    def forward(self, x: dict[str, torch.Tensor]) -> Output:
        h = self.encode(x)
        if not h:
            raise ValueError(f"batch holds none of the modalities {self.modalities}")
        mm = self._fuse(h)
        if len(self.modalities) == 1:
            return Output(mm, {self.modalities[0]: mm}, h)
        return Output(mm, OnDemand(list(h), lambda m: self._fuse({m: h[m]})), h)

    @torch.no_grad()
    def eval_logits(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return uni_modal_views(self.forward(x))


class EnsembleNet(MultimodalNet):
    """One encoder and one linear classifier per modality, nothing shared: uni-modal models side by side.

    The multimodal prediction is the sum of the present modalities' logits (the uni-modal ensemble of
    Du et al., ICML 2023); a missing modality simply adds nothing.
    """

    absent_modality = "ensemble member"

    def __init__(self, modalities: tuple[str, ...], shapes: dict[str, tuple[int, ...]], encoders: Mapping[str, str],
                 num_classes: int, dim: int, width: int, vocab_sizes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        vocab = vocab_sizes or {}
        self.encoders = nn.ModuleDict({m: build_encoder(encoders[m], shapes[m], dim, width, m, vocab.get(m))
                                       for m in modalities})
        self.classifiers = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in modalities})

    def forward(self, x: dict[str, torch.Tensor]) -> Output:
        h = self.encode(x)
        if not h:
            raise ValueError(f"batch holds none of the modalities {self.modalities}")
        uni = {m: self.classifiers[m](hm) for m, hm in h.items()}
        return Output(torch.stack(list(uni.values())).sum(dim=0), uni, h)

    @torch.no_grad()
    def eval_logits(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return uni_modal_views(self.forward(x))


class TeacherStudentNet(FusionNet):
    """The plain fusion network (the student) with a uni-modal teacher per modality beside it: an encoder
    (``teachers.<m>``) and a linear classifier (``classifiers.<m>``) each. Forward and evaluation are the
    student's; :meth:`teach` runs the teachers (Du et al., ICML 2023, uni-modal teacher)."""

    def __init__(self, modalities: tuple[str, ...], shapes: dict[str, tuple[int, ...]], encoders: Mapping[str, str],
                 num_classes: int, dim: int, width: int, fusion: str = "concat",
                 vocab_sizes: dict[str, int] | None = None) -> None:
        super().__init__(modalities, shapes, encoders, num_classes, dim, width, fusion, vocab_sizes)
        vocab = vocab_sizes or {}
        self.teachers = nn.ModuleDict({m: build_encoder(encoders[m], shapes[m], dim, width, m, vocab.get(m))
                                       for m in modalities})
        self.classifiers = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in modalities})

    def teach(self, x: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per present modality, the teacher's features and logits."""
        out = {}
        for m in self.modalities:
            if m in x:
                h = self.teachers[m](x[m])
                out[m] = (h, self.classifiers[m](h))
        return out
