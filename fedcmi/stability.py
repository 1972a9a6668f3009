"""Whether a finished run is stable: the divergence guard catches a run that falls to chance; this catches
one that collapsed from its peak or swung between good and bad rounds, yet ended above chance (FedAvg at
too high a learning rate: 0.16 to 0.66 and back to 0.21). Such a run ends with a warning naming the
figures and the learning-rate advice, its figures are in the run's record, and ``fedcmi register`` does not
take it.

The figures are relative to the run's gain over chance (its peak minus chance), so they read the same on
two classes or twenty: ``lost`` is the share of that gain gone between the peak and the last evaluation;
``swing`` the largest rise or fall between consecutive evaluations in the second half of training. A run
with fewer than ``MIN_EVALUATIONS`` evaluations, or one that never rose ``RISEN`` above chance, is not
judged (too short to say; the divergence guard speaks for the second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcmi.data import DataModule
from fedcmi.divergence import RISEN, chance_accuracy
from fedcmi.round.record import RoundRecord

MIN_EVALUATIONS = 5
#: past these shares of the gain over chance, a run is unstable
MAX_LOST = 0.5
MAX_SWING = 0.5


@dataclass(frozen=True)
class Stability:
    peak: float
    peak_round: int
    last: float
    chance: float
    lost: float  # share of the gain over chance lost from the peak to the last evaluation
    swing: float  # largest step between evaluations in the second half, as a share of that gain
    judged: bool

    @property
    def unstable(self) -> bool:
        return self.judged and (self.lost > MAX_LOST or self.swing > MAX_SWING)

    def reason(self, lr: float) -> str:
        what = []
        if self.lost > MAX_LOST:
            what.append(f"it fell from {self.peak:.3f} (round {self.peak_round}) to {self.last:.3f}, losing "
                        f"{self.lost:.0%} of its gain over chance ({self.chance:.3f})")
        if self.swing > MAX_SWING:
            what.append(f"it swung by up to {self.swing:.0%} of that gain between evaluations late in training")
        return (f"unstable: {' and '.join(what)}; lower optim.lr (now {lr:g}; try {lr / 4:g}) or set "
                "algorithm.mu > 0, and look at its curve before using the model")

    def figures(self) -> dict[str, float]:
        return {"peak_accuracy": self.peak, "lost_from_peak": self.lost, "late_swing": self.swing,
                "unstable": float(self.unstable)}


def stability(points: Sequence[tuple[int, float]], chance: float) -> Stability:
    """The stability of a run from its evaluated (round, mm_acc) points, in round order."""
    if not points:
        return Stability(chance, 0, chance, chance, 0.0, 0.0, False)
    peak_round, peak = max(points, key=lambda p: (p[1], -p[0]))
    last = points[-1][1]
    gain = peak - chance
    judged = len(points) >= MIN_EVALUATIONS and gain >= RISEN
    if gain <= 0:
        return Stability(peak, peak_round, last, chance, 0.0, 0.0, False)
    late = [acc for _, acc in points[len(points) // 2:]]
    swing = max((abs(b - a) for a, b in zip(late, late[1:], strict=False)), default=0.0) / gain
    return Stability(peak, peak_round, last, chance, max(0.0, (peak - last) / gain), swing, judged)


def run_stability(history: Sequence[RoundRecord], data: DataModule) -> Stability:
    """The stability of a run from its round records, against the test split's chance level."""
    points = [(r.round, r.evaluation.mm_acc) for r in history if r.evaluation is not None]
    return stability(points, chance_accuracy(data.test.labels, data.spec.num_classes))
