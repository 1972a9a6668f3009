"""Evaluation metrics against their textbook definitions."""

import numpy as np
import pytest

from fedcmi.metrics import Evaluation, confusion_matrix, headline_names, macro_f1


def test_macro_f1_counts_a_class_that_is_only_predicted():
    # classes 0 and 1 are true; class 2 is predicted once and never true: F1 = (1 + 2/3 + 0) / 3
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])
    assert macro_f1(confusion_matrix(pred, y, 4)) == pytest.approx(5 / 9)


def test_macro_f1_of_a_perfect_and_of_an_all_wrong_prediction():
    y = np.array([0, 1, 2, 2])
    assert macro_f1(confusion_matrix(y, y, 3)) == 1.0
    assert macro_f1(confusion_matrix((y + 1) % 3, y, 3)) == 0.0


def test_confusion_matrix_rows_are_the_true_class():
    cm = confusion_matrix(np.array([1, 1, 0]), np.array([0, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]


def test_a_metrics_file_lists_the_headline_first_and_classes_by_number():
    ev = Evaluation(mm_acc=0.8, uni_acc={"visual": 0.3, "audio": 0.7}, pred_top_frac=0.2,
                    class_acc=[0.5] * 11)
    names = list(ev.flat())
    assert names[:3] == ["mm_acc", "uni_acc_audio", "uni_acc_visual"]
    assert names.index("pred_top_frac") < names.index("class_acc_0")
    assert names[-11:] == [f"class_acc_{c}" for c in range(11)]  # classes by number: 2 before 10


def test_the_flat_figures_read_back_into_the_same_record():
    ev = Evaluation(mm_acc=0.8, uni_acc={"audio": 0.7, "visual": 0.3}, path_acc={"audio": 0.6, "visual": 0.2},
                    probe_acc={"audio": 0.75}, worst_class_acc=0.1, mm_f1=0.7, imbalance_ratio=2.33,
                    class_acc_spread=0.5, pred_top_frac=0.3, mm_logit_spread=0.9, class_acc=[0.1, 0.6, 0.9])
    assert Evaluation.from_flat(ev.flat()) == ev
    assert Evaluation.from_flat({"round": 3}) is None


def test_the_headline_figures_are_the_ones_where_higher_is_better():
    names = headline_names(("audio", "visual"))
    assert names[0] == "mm_acc" and {"mm_f1", "worst_class_acc", "path_acc_visual", "probe_acc_audio"} <= set(names)
    assert "imbalance_ratio" not in names and "pred_top_frac" not in names


def test_uar_is_balanced_accuracy_over_the_classes_present():
    """UAR: the mean of the per-class recalls (scikit-learn's balanced_accuracy_score), which accuracy is
    not under class imbalance; a class absent from the labels does not count."""
    from fedcmi.metrics import from_logits

    y = np.array([0] * 8 + [1, 1, 2, 2])  # class 3 never occurs
    pred = np.array([0] * 8 + [0, 1, 0, 3])
    logits = np.eye(4)[pred]
    ev = from_logits({"mm": logits}, y, 4, ())
    assert ev.mm_acc == pytest.approx(9 / 12)
    assert ev.mm_uar == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert "mm_uar" in headline_names(("audio", "visual")) and "mm_uar" in ev.curves()
