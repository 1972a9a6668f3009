"""The divergence guard: a run whose loss stops being finite, or whose accuracy falls
to chance, stops with a clear message instead of finishing "successfully".

Chance is the accuracy of always predicting the test split's most frequent
class. A run has *fallen* to chance when it was clearly above it (by
``RISEN``) and then stays within ``margin`` of it for ``patience``
evaluations in a row, or ends there. A run has *collapsed* when it sits at
chance while its logits no longer depend on the input (their spread across
the test samples at most ``DEAD`` of their size: the encoders' units are
dead) for ``patience`` evaluations in a row. Those, a non-finite training loss, and a training
loss that blows up to ``BLOWUP`` times the first round's, raise
:class:`Diverged`, whose message suggests a smaller learning rate. A run
that merely has not risen above chance yet is not called diverged (a short
run on hard data may not have learned yet); :meth:`DivergenceGuard.check_final`
returns a warning for it instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcmi.errors import EXIT_DIVERGED, FedcmiError
from fedcmi.round.record import RoundRecord

RISEN = 0.10  # how far above chance a run must have been before a return to chance counts as falling
BLOWUP = 100.0  # a training loss this many times the first round's has run away
DEAD = 1e-4  # logits that vary this little with the input come from a dead network


class Diverged(FedcmiError, RuntimeError):
    """Training diverged; the last good round stays checkpointed."""

    exit_code = EXIT_DIVERGED
    retry_helps = False  # the same seed and settings diverge again


def lr_advice(lr: float) -> str:
    """What every divergence message ends with."""
    return (f"; lower optim.lr (now {lr:g}; try {lr / 4:g}) or set algorithm.mu > 0. "
            "The last good round stays checkpointed")


def chance_accuracy(labels: np.ndarray, num_classes: int) -> float:
    """Accuracy of always predicting the most frequent class of ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / max(counts.sum(), 1))


@dataclass
class DivergenceGuard:
    chance: float
    lr: float
    patience: int = 3
    margin: float = 0.02
    best: float = 0.0
    near_chance: int = 0
    first_loss: float | None = None

    def _advice(self) -> str:
        return lr_advice(self.lr)

    def check_round(self, rec: RoundRecord) -> str | None:
        """The reason this round shows divergence, or None. Call once per round, after its evaluation."""
        rnd = rec.round
        loss = rec.train.get("loss")
        if isinstance(loss, (int, float)):
            if not math.isfinite(loss):
                return f"diverged: the training loss became {loss} in round {rnd}" + self._advice()
            if self.first_loss is None:
                self.first_loss = float(loss)
            elif self.first_loss > 0 and loss > BLOWUP * self.first_loss:
                return (f"diverged: the training loss ran away to {loss:.4g} in round {rnd} (round 1: "
                        f"{self.first_loss:.4g})" + self._advice())
        if rec.evaluation is None:
            return None
        acc = rec.evaluation.mm_acc
        if not math.isfinite(acc):
            return f"diverged: the test accuracy became {acc} in round {rnd}" + self._advice()
        self.best = max(self.best, acc)
        at_chance = acc <= self.chance + self.margin
        fell = self.best >= self.chance + RISEN
        dead = rec.evaluation.mm_logit_spread <= DEAD
        self.near_chance = self.near_chance + 1 if at_chance and (fell or dead) else 0
        if self.near_chance < self.patience:
            return None
        if fell:
            return (f"diverged: the multimodal accuracy fell from {self.best:.3f} to chance level ({acc:.3f}, "
                    f"chance {self.chance:.3f}) for {self.patience} evaluations, in round {rnd}" + self._advice())
        return (f"diverged: the model collapsed: its output no longer depends on the input (dead units; "
                f"accuracy {acc:.3f}, chance {self.chance:.3f}) for "
                f"{self.patience} evaluations, in round {rnd}" + self._advice())

    def check_final(self, acc: float) -> tuple[str | None, str | None]:
        """(the reason the final model shows divergence, a warning), each None when there is none."""
        if not math.isfinite(acc):
            return f"diverged: the final multimodal accuracy is {acc}" + self._advice(), None
        if acc > self.chance + self.margin:
            return None, None
        if max(self.best, acc) >= self.chance + RISEN:
            return (f"diverged: the multimodal accuracy fell from {self.best:.3f} to chance level ({acc:.3f}, "
                    f"chance {self.chance:.3f}) by the last round" + self._advice()), None
        return None, (f"the final multimodal accuracy {acc:.3f} is at chance level ({self.chance:.3f}): the model "
                      "has not learned; more rounds, or another optim.lr, may be needed")
