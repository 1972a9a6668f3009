"""The plots a run writes: readable ticks, titles and digits."""

import numpy as np

from fedcmi.config import config_from_dict
from fedcmi.plots import confusion_figure, curves_figure, run_title
from fedcmi.round.record import RoundRecord


def test_rounds_are_whole_numbers_on_the_curves():
    history = [RoundRecord.from_json({"round": r, "mm_acc": 0.3 + 0.1 * r, "worst_class_acc": 0.1}) for r in (1, 2, 3)]
    fig = curves_figure(history, ["audio", "visual"])
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_run_title_names_the_learning_rate():
    cfg = config_from_dict({"optim": {"lr": 0.015}, "seed": 4})
    assert "lr 0.015" in run_title(cfg) and "seed 4" in run_title(cfg)


def test_confusion_shows_counts_and_row_shares_with_readable_digits():
    cm = [[50, 2, 0], [5, 40, 5], [0, 0, 1]]
    fig = confusion_figure(cm, ["a", "b", "c"])
    counts, shares = fig.axes[:2]
    colors = {t.get_text(): t.get_color() for t in counts.texts}
    assert colors["50"] == "white" and colors["2"] == "black"  # white on the dark cell, black on the light
    share_values = np.array([float(t.get_text()) for t in shares.texts]).reshape(3, 3)
    assert np.allclose(share_values.sum(axis=1), 1.0, atol=0.02)
    assert [t.get_text() for t in shares.texts][8] == "1.00"  # the small class is as visible as the big
