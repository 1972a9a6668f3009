"""The registry's promotion gate: whether a candidate version takes ``champion``.

A multimodal model can beat the champion's headline while one modality's own path, or the answers when a
modality is absent, get worse: the fused head learned to lean on the dominant modality. The gate moves
``champion`` only when the headline improves on the same test data and no guarded figure (each
``path_acc_<m>``, each ``absent_acc_<percent>``) falls further than its tolerance below the champion's.
Versions carry their figures as tags, so the decision needs nothing but the two versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedcmi.config import Config
from fedcmi.metrics import Evaluation

#: the version tag that holds the gate's decision, one line
REASON_TAG = "promotion"


@dataclass(frozen=True)
class Guard:
    """One guarded figure of the candidate against the champion's."""

    name: str
    candidate: float
    champion: float
    tolerance: float

    @property
    def fell(self) -> bool:
        return self.candidate < self.champion - self.tolerance - 1e-12

    def says(self) -> str:
        return (f"{self.name} {self.candidate:.4f} is {self.champion - self.candidate:.4f} below the champion's "
                f"{self.champion:.4f} (tolerance {self.tolerance:g})")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate is promoted, the one-line reason, and every guard it was checked against."""

    promoted: bool
    reason: str
    guards: tuple[Guard, ...] = field(default=())


def guarded_figures(ev: Evaluation) -> dict[str, float]:
    """The figures the gate guards, by flat name: each single-modality path and each absent-modality rate."""
    out = {f"path_acc_{m}": v for m, v in sorted(ev.path_acc.items())}
    out.update({f"absent_acc_{r}": v for r, v in sorted(ev.absent_acc.items(), key=lambda kv: float(kv[0]))})
    return out


def version_tags(cfg: Config, figures: Mapping[str, float]) -> dict[str, str]:
    """What a version carries so that a later candidate can be gated against it: the headline and the
    guarded figures."""
    metric = cfg.tracking.headline_metric
    ev = Evaluation.from_flat(figures)
    tags = {name: str(float(figures[name])) for name in (metric, "mm_acc") if name in figures}
    if ev is not None:
        tags.update({k: str(v) for k, v in guarded_figures(ev).items()})
    return tags


def decide(cfg: Config, candidate: Mapping[str, float], champion_tags: Mapping[str, str],
           champion_version: str) -> Decision:
    """The gate, given the candidate's figures and the champion version's tags (both on the same data)."""
    metric = cfg.tracking.headline_metric
    head, champ_head = float(candidate[metric]), float(champion_tags.get(metric, "nan"))
    tol = cfg.tracking.promotion
    ev = Evaluation.from_flat(candidate)
    guards: list[Guard] = []
    for name, value in (guarded_figures(ev) if ev is not None else {}).items():
        if name in champion_tags:
            limit = tol.path_tolerance if name.startswith("path_acc_") else tol.absent_tolerance
            guards.append(Guard(name, value, float(champion_tags[name]), limit))
    if not head > champ_head:
        return Decision(False, f"{metric} {head:.4f} <= champion v{champion_version}'s {champ_head:.4f}",
                        tuple(guards))
    fallen = [g for g in guards if g.fell]
    if fallen:
        return Decision(False, f"{metric} {head:.4f} beats champion v{champion_version}'s {champ_head:.4f}, but "
                        + "; ".join(g.says() for g in fallen), tuple(guards))
    unguarded = "" if guards else " (the champion carries no path or absent-modality figures: headline only)"
    return Decision(True, f"{metric} {head:.4f} > champion v{champion_version}'s {champ_head:.4f}, "
                    f"{len(guards)} guarded figures within tolerance{unguarded}", tuple(guards))


def tag_figures(tags: Mapping[str, str]) -> dict[str, float]:
    """A version's figures from its tags (the run id, data hash and reason are not figures)."""
    out = {}
    for k, v in tags.items():
        if k in ("run_id", "data_hash", REASON_TAG):
            continue
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


def sweep_report(folder: Path, version: str, candidate: Mapping[str, float],
                 champion: Mapping[str, float] | None, decision: Decision) -> list[Path]:
    """The absent-modality sweep of the candidate (and the champion it was gated against) as JSON and a
    plot, written into ``folder`` for the version's run: accuracy against the share of samples lacking a
    modality, from 0 (``mm_acc``) to each rate evaluated."""
    from fedcmi.io import write_json
    from fedcmi.plots import absent_sweep_plot

    def curve(figures: Mapping[str, float] | None) -> dict[float, float]:
        ev = Evaluation.from_flat(figures or {})
        if ev is None:
            return {}
        points = {float(r) / 100: v for r, v in ev.absent_acc.items()}
        return dict(sorted({0.0: ev.mm_acc, **points}.items()))

    report = {"version": version, "promoted": decision.promoted, "reason": decision.reason,
              "candidate": {str(k): v for k, v in curve(candidate).items()},
              "champion": {str(k): v for k, v in curve(champion).items()} if champion else None,
              "guards": [g.__dict__ | {"fell": g.fell} for g in decision.guards]}
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_json(folder / "promotion.json", json.loads(json.dumps(report)))]
    files.append(absent_sweep_plot(folder / "absent_sweep.png", f"v{version}", curve(candidate),
                                   curve(champion) if champion else None))
    return files
