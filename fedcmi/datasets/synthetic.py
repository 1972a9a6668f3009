"""The embedded default dataset: seeded, two modalities, a built-in imbalance.

Two generators, chosen by ``data.synthetic.generator``.

``latent`` (the default). Each sample draws one latent: its class ``y``, an
expression *intensity* ``a`` (uniform in ``intensity``) shared by both
modalities, a *blind* flag (probability ``strong_blind``) and a polarity. The
classes come in pairs (0,1), (2,3), ...; each modality has smooth random
templates, and a sample is a weighted sum of them plus N(0, 1) weights on
every class template, white noise and a small jitter:

- the *strong* (audio-like) modality shows its pair's template at
  ``a * strong_snr`` and, unless blind, its class's template at the same
  strength. On a blind sample it carries no evidence between the two classes
  of the pair: its posterior is split between them (uncertainty), never
  confidently wrong. Alone it tops out near ``1 - strong_blind / 2``.
- the *weak* (visual-like) modality shows its pair's template and a
  first-or-second-member template, both at ``a * weak_snr``, times the clip's
  polarity (+1 or -1), plus ``CLUTTER`` class-free patterns at strength
  ``weak_clutter`` and white noise of a per-clip level drawn from
  ``weak_noise``. Every class's mean input is zero, so no linear read-out of
  the pixels gets past chance and a random encoder's features stay far below
  a trained one's: the encoder has to learn polarity-invariant detectors
  that tune the clutter and noise out. It separates every class, the pair
  included.

Together they beat either alone (the weak modality resolves the strong one's
blind spots), and in joint training the strong modality explains the pairs
early, so the gradient that reaches the weak encoder asks only for the
distinction within a pair: the weak encoder is starved of what it could learn
about the rest. That is the imbalance FedCMI is meant to repair.

``templates`` (the first version, kept to reproduce earlier figures with
``strong_snr=4 weak_snr=1.5 strong_confusion=0.2``): one template per class
and modality; the strong modality shows the partner class on a fraction
``strong_confusion`` of samples (confidently wrong there).

:func:`bayes_accuracy` gives each view's ceiling on the template weights
(white noise and jitter ignored, so upper bounds).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from fedcmi.config import Config, Float, Int, Section
from fedcmi.data.base import DatasetSpec, Split
from fedcmi.datasets.base import Dataset


class SyntheticOptions(Section):
    """The embedded default dataset: an audio-like (strong) and a visual-like (weak) modality.

    ``generator: latent`` (the default) draws both modalities from one per-sample
    latent; ``templates`` is the first version's generator, kept so that its
    figures can be reproduced (see this module's docstring).
    """

    generator: Literal["latent", "templates"] = "latent"
    num_train: Int = Field(2400, ge=10)
    num_test: Int = Field(600, ge=10)
    num_val: Int = Field(600, ge=0, description="validation samples, for choosing settings; 0 for none")
    num_classes: Int = Field(6, ge=2, le=64)
    strong_modality: str = "audio"
    spectrogram: tuple[int, int] = (16, 16)
    frames: Int = Field(2, ge=1, le=16)
    frame_size: Int = Field(16, ge=8, le=64)
    strong_snr: Float = Field(4.0, gt=0, allow_inf_nan=False)
    weak_snr: Float = Field(1.75, gt=0, allow_inf_nan=False)
    strong_blind: Float = Field(
        0.3, ge=0, le=1, description="latent: fraction of samples where the strong modality shows only the class "
        "pair, not the class (its blind spot: uncertain between the two, never confidently wrong)")
    intensity: tuple[float, float] = Field(
        (0.5, 1.5), description="latent: range of the per-sample expression intensity that scales the class "
        "evidence in both modalities at once")
    weak_noise: tuple[float, float] = Field(
        (0.5, 4.0), description="latent: range of the per-clip white-noise level of the weak modality (its "
        "recording quality); a learned encoder filters it, a random one does not")
    weak_clutter: Float = Field(
        1.0, ge=0, le=100, allow_inf_nan=False, description="latent: strength of 8 fixed patterns that carry "
        "no class information in the weak modality (a learned encoder tunes them out, a random one cannot)")
    strong_confusion: Float = Field(
        0.2, ge=0, lt=0.5, description="templates: fraction of samples where the strong modality shows the "
        "partner class")

    @field_validator("intensity", "weak_noise")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= v[0] <= v[1] < 100):
            raise ValueError("must be [low, high] with 0 <= low <= high < 100")
        return v

    @field_validator("spectrogram")
    @classmethod
    def _spec_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8 or max(v) > 512:
            raise ValueError("each spectrogram side must be between 8 and 512")
        return v


def partner(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The class each label is confused with by the strong modality."""
    p = labels ^ 1
    return np.where(p < num_classes, p, labels - 1)


def _smooth_templates(rng: np.random.Generator, k: int, shape: tuple[int, ...], coarse: int = 4) -> np.ndarray:
    """``k`` smooth random patterns of ``shape`` (C, H, W), unit RMS each."""
    c, h, w = shape
    low = rng.standard_normal((k, c, coarse, coarse))
    rows = np.linspace(0, coarse - 1, h)
    cols = np.linspace(0, coarse - 1, w)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, coarse - 1), np.minimum(c0 + 1, coarse - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    up = (
        low[..., r0[:, None], c0[None, :]] * (1 - fr) * (1 - fc)
        + low[..., r1[:, None], c0[None, :]] * fr * (1 - fc)
        + low[..., r0[:, None], c1[None, :]] * (1 - fr) * fc
        + low[..., r1[:, None], c1[None, :]] * fr * fc
    )
    up -= up.mean(axis=(1, 2, 3), keepdims=True)
    up /= np.sqrt((up**2).mean(axis=(1, 2, 3), keepdims=True)) + 1e-12
    return up.astype(np.float32)


def _coefficients(rng: np.random.Generator, shown: np.ndarray, k: int, snr: float) -> np.ndarray:
    """Per-sample template weights: N(0, 1) for every class, plus ``snr`` for the shown one."""
    coeff = rng.standard_normal((len(shown), k)).astype(np.float32)
    coeff[np.arange(len(shown)), shown] += snr
    return coeff


def _render(
    rng: np.random.Generator, templates: np.ndarray, coeff: np.ndarray, jitter_axis: int, max_shift: int,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Samples from templates (K, C, H, W) weighted by ``coeff`` (N, K), plus white noise (of std ``noise``
    per sample, 1 when None) and jitter."""
    n = len(coeff)
    x = np.einsum("nk,kchw->nchw", coeff, templates)
    white = rng.standard_normal(x.shape).astype(np.float32)
    if noise is not None:
        white *= noise.astype(np.float32)[:, None, None, None]
    x += white
    shifts = rng.integers(-max_shift, max_shift + 1, size=n)
    for s in np.unique(shifts):
        sel = shifts == s
        x[sel] = np.roll(x[sel], int(s), axis=jitter_axis)
    return x


CLUTTER = 8  # patterns in the weak modality that carry no class information


def num_groups(num_classes: int) -> int:
    """Classes are paired (0,1), (2,3), ...; an odd last class is a group of its own."""
    return (num_classes + 1) // 2


def draw_latent(rng: np.random.Generator, labels: np.ndarray, cfg: SyntheticOptions) -> dict[str, np.ndarray]:
    """Per-sample template weights of the ``latent`` generator (see the module docstring).

    ``strong_class`` (N, K), ``strong_group`` (N, G) and ``weak`` (N, G + 2 + CLUTTER) are the
    weights rendered into each modality; ``intensity``, ``blind`` and
    ``polarity`` are the latent itself.
    """
    n, k, g = len(labels), cfg.num_classes, num_groups(cfg.num_classes)
    rows = np.arange(n)
    lo, hi = cfg.intensity
    a = rng.uniform(lo, hi, n)
    blind = rng.random(n) < cfg.strong_blind
    polarity = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    sc = rng.standard_normal((n, k))
    sc[rows, labels] += np.where(blind, 0.0, a * cfg.strong_snr)
    sg = rng.standard_normal((n, g))
    sg[rows, labels // 2] += a * cfg.strong_snr
    # The weak modality: which pair (G weights) and which member of it (2 weights), with one polarity.
    w = rng.standard_normal((n, g + 2))
    w[rows, labels // 2] += a * cfg.weak_snr
    w[rows, g + labels % 2] += a * cfg.weak_snr
    w *= polarity[:, None]
    noise = rng.uniform(*cfg.weak_noise, n)
    w = np.concatenate([w, cfg.weak_clutter * rng.standard_normal((n, CLUTTER))], axis=1)
    return {"strong_class": sc.astype(np.float32), "strong_group": sg.astype(np.float32),
            "weak": w.astype(np.float32), "intensity": a, "blind": blind, "polarity": polarity,
            "weak_noise": noise}


class SyntheticSource:
    """Generates the train and test splits from a :class:`SyntheticOptions`."""

    def __init__(self, cfg: SyntheticOptions, modalities: tuple[str, str], seed: int) -> None:
        self.cfg = cfg
        self.modalities = modalities
        self.seed = seed
        self.strong = cfg.strong_modality
        self.weak = modalities[1] if modalities[0] == self.strong else modalities[0]

    def _kinds(self) -> dict[str, str]:
        # The first modality is spectrogram-like, the second a clip of frames.
        return {self.modalities[0]: "spectrogram", self.modalities[1]: "frames"}

    def spec(self) -> DatasetSpec:
        c = self.cfg
        shapes: dict[str, tuple[int, ...]] = {}
        for m, kind in self._kinds().items():
            shapes[m] = (1, *c.spectrogram) if kind == "spectrogram" else (c.frames, 3, c.frame_size, c.frame_size)
        names = tuple(f"class_{i}" for i in range(c.num_classes))
        return DatasetSpec(self.modalities, shapes, c.num_classes, names)

    def generate(self) -> dict[str, Split]:
        if self.cfg.generator == "latent":
            return self._generate_latent()
        return self._generate_templates()

    def _split_sizes(self) -> dict[str, tuple[int, int]]:
        c = self.cfg
        # Each split draws from a stream of its own, so adding or resizing one leaves the others as they were.
        return {"train": (c.num_train, 1), "test": (c.num_test, 2), "val": (c.num_val, 3)}

    def _generate_latent(self) -> dict[str, Split]:
        c = self.cfg
        spec = self.spec()
        kinds = self._kinds()
        rng = np.random.default_rng([self.seed, 7919, 101])
        k, g = c.num_classes, num_groups(c.num_classes)
        templates: dict[str, dict[str, np.ndarray]] = {}
        for m, kind in kinds.items():
            tshape = spec.shapes[m] if kind == "spectrogram" else spec.shapes[m][1:]
            if m == self.strong:
                templates[m] = {"class": _smooth_templates(rng, k, tshape), "group": _smooth_templates(rng, g, tshape)}
            else:  # G pair templates, the first-member and second-member templates, then the clutter
                templates[m] = {"class": _smooth_templates(rng, g + 2 + CLUTTER, tshape)}
        splits = {}
        for split_name, (n, stream) in self._split_sizes().items():
            if n == 0:
                continue
            srng = np.random.default_rng([self.seed, 7919, 101, stream])
            labels = np.arange(n) % k
            srng.shuffle(labels)
            lat = draw_latent(srng, labels, c)
            feats = {}
            for m, kind in kinds.items():
                if m == self.strong:
                    coeff = np.concatenate([lat["strong_class"], lat["strong_group"]], axis=1)
                    tpl = np.concatenate([templates[m]["class"], templates[m]["group"]])
                else:
                    coeff, tpl = lat["weak"], templates[m]["class"]
                noise = None if m == self.strong else lat["weak_noise"]
                if kind == "spectrogram":
                    x = _render(srng, tpl, coeff, jitter_axis=3, max_shift=max(1, spec.shapes[m][2] // 8),
                                noise=noise)
                else:
                    frames = [_render(srng, tpl, coeff, jitter_axis=3, max_shift=1, noise=noise)
                              for _ in range(c.frames)]
                    x = np.stack(frames, axis=1)
                feats[m] = x.astype(np.float32)
            splits[split_name] = Split(feats, labels.astype(np.int64))
        return splits

    def _generate_templates(self) -> dict[str, Split]:
        c = self.cfg
        spec = self.spec()
        rng = np.random.default_rng([self.seed, 7919])
        templates = {}
        for m, kind in self._kinds().items():
            tshape = spec.shapes[m] if kind == "spectrogram" else spec.shapes[m][1:]
            templates[m] = _smooth_templates(rng, c.num_classes, tshape)
        splits = {}
        for split_name, (n, stream) in self._split_sizes().items():
            if n == 0:
                continue
            srng = np.random.default_rng([self.seed, 7919, stream])
            labels = np.arange(n) % c.num_classes
            srng.shuffle(labels)
            feats = {}
            for m, kind in self._kinds().items():
                strong = m == self.strong
                shown = labels.copy()
                if strong:
                    flip = srng.random(n) < c.strong_confusion
                    shown[flip] = partner(labels[flip], c.num_classes)
                coeff = _coefficients(srng, shown, c.num_classes, c.strong_snr if strong else c.weak_snr)
                if kind == "spectrogram":
                    x = _render(srng, templates[m], coeff, jitter_axis=3, max_shift=max(1, spec.shapes[m][2] // 8))
                else:
                    # Frames of one clip share its class evidence; only pixel noise and jitter differ.
                    frames = [_render(srng, templates[m], coeff, jitter_axis=3, max_shift=1) for _ in range(c.frames)]
                    x = np.stack(frames, axis=1)
                feats[m] = x.astype(np.float32)
            splits[split_name] = Split(feats, labels.astype(np.int64))
        return splits


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    mx = x.max(axis=axis, keepdims=True)
    return np.squeeze(mx, axis) + np.log(np.exp(x - mx).sum(axis=axis))


def bayes_accuracy(cfg: SyntheticOptions, n: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo accuracy of the ideal classifier per view, knowing the generator.

    Works on the template weights directly (jitter and white noise ignored),
    so these are upper bounds on what a learned model can reach.
    """
    if cfg.generator == "templates":
        return _bayes_templates(cfg, n, seed)
    rng = np.random.default_rng(seed)
    k = cfg.num_classes
    y = rng.integers(0, k, n)
    lat = draw_latent(rng, y, cfg)
    sc, sg, w = (lat[key].astype(np.float64) for key in ("strong_class", "strong_group", "weak"))
    w = w[:, :-CLUTTER]  # the clutter's weights are independent of the class: they drop out of the posterior
    lo, hi = cfg.intensity
    grid = np.linspace(lo, hi, 15)  # the uniform intensity prior, integrated on a grid
    q = cfg.strong_blind
    eye = np.eye(k)
    groups = np.eye(num_groups(k))[np.arange(k) // 2]
    weak_code = np.concatenate([groups, np.eye(2)[np.arange(k) % 2]], axis=1)  # (K, G + 2)
    # log p(x | y, a) for every sample, class and intensity: (N, K, A)
    ls = np.empty((n, k, len(grid)))
    lw = np.empty((n, k, len(grid)))
    for j, a in enumerate(grid):
        mg = a * cfg.strong_snr * groups  # (K, G)
        lg = -0.5 * ((sg[:, None, :] - mg[None]) ** 2).sum(-1)
        seen = -0.5 * ((sc[:, None, :] - a * cfg.strong_snr * eye[None]) ** 2).sum(-1)
        unseen = -0.5 * (sc**2).sum(-1)[:, None].repeat(k, 1)
        with np.errstate(divide="ignore"):
            ls[:, :, j] = lg + np.logaddexp(np.log(1 - q) + seen, np.log(q) + unseen)
        plus = -0.5 * ((w[:, None, :] - a * cfg.weak_snr * weak_code[None]) ** 2).sum(-1)
        minus = -0.5 * ((w[:, None, :] + a * cfg.weak_snr * weak_code[None]) ** 2).sum(-1)
        lw[:, :, j] = np.logaddexp(plus, minus)
    return {
        "strong": float((_logsumexp(ls, 2).argmax(1) == y).mean()),
        "weak": float((_logsumexp(lw, 2).argmax(1) == y).mean()),
        "multimodal": float((_logsumexp(ls + lw, 2).argmax(1) == y).mean()),  # the intensity is shared
    }


def _bayes_templates(cfg: SyntheticOptions, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    k = cfg.num_classes
    y = rng.integers(0, k, n)
    shown = y.copy()
    flip = rng.random(n) < cfg.strong_confusion
    shown[flip] = partner(y[flip], k)
    s = rng.standard_normal((n, k))
    s[np.arange(n), shown] += cfg.strong_snr
    w = rng.standard_normal((n, k))
    w[np.arange(n), y] += cfg.weak_snr

    def loglik(score: np.ndarray, snr: float) -> np.ndarray:
        return snr * score  # log N(score; snr*e_c, I) up to a constant

    q = cfg.strong_confusion
    ls = loglik(s, cfg.strong_snr)
    # strong view: p(x_s | y) = (1-q) f(shown=y) + q f(shown=partner(y))
    ps = (1 - q) * np.exp(ls - ls.max(1, keepdims=True))
    ps = ps + q * ps[:, partner(np.arange(k), k)]
    lw = loglik(w, cfg.weak_snr)
    pw = np.exp(lw - lw.max(1, keepdims=True))
    return {
        "strong": float((ps.argmax(1) == y).mean()),
        "weak": float((pw.argmax(1) == y).mean()),
        "multimodal": float(((ps * pw).argmax(1) == y).mean()),
    }


#: Keys of ``data.synthetic`` that one generator reads and the other does not.
GENERATOR_ONLY: dict[str, tuple[str, ...]] = {
    "latent": ("strong_blind", "intensity", "weak_noise", "weak_clutter"),
    "templates": ("strong_confusion",),
}


class Synthetic(Dataset):
    """The embedded default: an audio-like (strong) and a visual-like (weak) modality, generated from the
    seed (``data.synthetic``)."""

    name = "synthetic"
    Options = SyntheticOptions

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        opts = cfg.data.options(SyntheticOptions)
        if opts.strong_modality not in cfg.data.modalities:
            raise ValueError(f"data.synthetic.strong_modality must be one of {list(cfg.data.modalities)}")

    @classmethod
    def unused_settings(cls, cfg: Config) -> set[str]:
        other = "templates" if cfg.data.options(SyntheticOptions).generator == "latent" else "latent"
        return {f"data.synthetic.{key}" for key in GENERATOR_ONLY[other]}

    @classmethod
    def source(cls, cfg: Config) -> SyntheticSource:
        return SyntheticSource(cfg.data.options(SyntheticOptions), cfg.data.modalities, cfg.seed)

    @classmethod
    def describe(cls, cfg: Config) -> dict[str, Any]:
        return {"synthetic": cfg.data.options(SyntheticOptions).model_dump(mode="json")}
