"""The embedded default dataset: seeded, two modalities, a built-in imbalance.

Each class ``c`` has a smooth random template per modality. A sample of class
``y`` is

    x = snr * template[y'] + sum_k a_k * template[k] + white noise,  a_k ~ N(0, 1)

shifted by a small random jitter (in time for the spectrogram, in space per
frame for the clip). The ``a_k`` put every class's pattern into every sample at
random strength, so how well a modality can tell the classes apart is set by
``snr`` alone, not by the input size.

- The *strong* modality has a large ``snr`` (easy and fast to learn) but, for a
  fraction ``strong_confusion`` of samples, shows the template of the label's
  partner class (0<->1, 2<->3, ...): alone it cannot beat ``1 - confusion``.
- The *weak* modality has a small ``snr`` and no confusion: alone it is slow to
  learn and noisy, but it is exactly what separates a class from its partner.

So the multimodal optimum beats either modality alone, and in joint training
the strong modality explains most samples early, starving the weak encoder of
gradient: the imbalance FedCMI is meant to fix. ``bayes_accuracy`` estimates
what each view could reach with the true templates known.
"""

from __future__ import annotations

import numpy as np

from fedcmi.config import SyntheticConfig
from fedcmi.data.base import DatasetSpec, Split


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
    rng: np.random.Generator, templates: np.ndarray, coeff: np.ndarray, jitter_axis: int, max_shift: int
) -> np.ndarray:
    """Samples from templates (K, C, H, W) weighted by ``coeff`` (N, K), plus white noise and jitter."""
    n = len(coeff)
    x = np.einsum("nk,kchw->nchw", coeff, templates)
    x += rng.standard_normal(x.shape).astype(np.float32)
    shifts = rng.integers(-max_shift, max_shift + 1, size=n)
    for s in np.unique(shifts):
        sel = shifts == s
        x[sel] = np.roll(x[sel], int(s), axis=jitter_axis)
    return x


class SyntheticSource:
    """Generates the train and test splits from a :class:`SyntheticConfig`."""

    def __init__(self, cfg: SyntheticConfig, modalities: tuple[str, str], seed: int) -> None:
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
        shapes = {}
        for m, kind in self._kinds().items():
            shapes[m] = (1, *c.spectrogram) if kind == "spectrogram" else (c.frames, 3, c.frame_size, c.frame_size)
        names = tuple(f"class_{i}" for i in range(c.num_classes))
        return DatasetSpec(self.modalities, shapes, c.num_classes, names)

    def generate(self) -> dict[str, Split]:
        c = self.cfg
        spec = self.spec()
        rng = np.random.default_rng([self.seed, 7919])
        templates = {}
        for m, kind in self._kinds().items():
            tshape = spec.shapes[m] if kind == "spectrogram" else spec.shapes[m][1:]
            templates[m] = _smooth_templates(rng, c.num_classes, tshape)
        splits = {}
        # Each split draws from a stream of its own, so adding or resizing one leaves the others as they were.
        sizes = {"train": (c.num_train, 1), "test": (c.num_test, 2), "val": (c.num_val, 3)}
        for split_name, (n, stream) in sizes.items():
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


def bayes_accuracy(cfg: SyntheticConfig, n: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo accuracy of the ideal template-matching classifier per view.

    Works on the class coefficients directly (jitter and white noise ignored),
    so these are upper bounds on what a learned model can reach.
    """
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
