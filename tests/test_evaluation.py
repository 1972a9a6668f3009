"""Evaluation metrics against their textbook definitions."""

import numpy as np
import pytest

from fedcmi.evaluation import confusion_matrix, macro_f1


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
    from fedcmi.evaluation import report_order

    metrics = {f"class_acc_{c}": 0.5 for c in (10, 2, 0)} | {"pred_top_frac": 0.2, "uni_acc_visual": 0.3,
                                                           "mm_acc": 0.8, "uni_acc_audio": 0.7, "zzz": 1.0}
    assert list(report_order(metrics)) == ["mm_acc", "uni_acc_audio", "uni_acc_visual", "pred_top_frac",
                                           "class_acc_0", "class_acc_2", "class_acc_10", "zzz"]
