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
                    absent_acc={"5": 0.79, "30": 0.7, "100": 0.4}, probe_acc={"audio": 0.75}, worst_class_acc=0.1, mm_f1=0.7, imbalance_ratio=2.33,
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


def test_absent_accuracy_answers_each_lost_sample_by_the_other_modalitys_path():
    from fedcmi.metrics import absent_accuracy

    y = np.array([0, 1, 2, 0])
    eye = np.eye(3)
    logits = {"mm": eye[[0, 1, 2, 0]],            # all right
              "path/audio": eye[[1, 1, 1, 1]],    # right on sample 1 only
              "path/visual": eye[[0, 0, 0, 0]]}   # right on samples 0 and 3
    mods = ("audio", "visual")
    assert absent_accuracy(logits, y, mods, {}) == 1.0
    # samples 0 and 1 lack audio (answered by path/visual: right, wrong); sample 2 lacks visual (path/audio: wrong)
    lost = {"audio": np.array([True, True, False, False]), "visual": np.array([False, False, True, False])}
    assert absent_accuracy(logits, y, mods, lost) == 0.5
    # a model without the visual path (single-modality audio model) cannot answer a sample lacking audio
    assert absent_accuracy({"mm": logits["mm"], "path/audio": logits["path/audio"]}, y, mods, lost) == 0.25


def test_the_evaluation_sweeps_absent_modalities_as_the_served_model_answers(tiny):
    """absent_acc_<percent> equals the accuracy of asking the network, per sample, with the modalities that
    sample kept: the same answers `mlflow models serve` gives to a request without one."""
    import torch

    from fedcmi.algorithms import build_model
    from fedcmi.data import DataModule
    from fedcmi.data.faults import missing_at_test
    from fedcmi.evaluation import evaluate_model

    cfg = tiny(algorithm={"name": "fedcmi"})
    data = DataModule(cfg.data.prepared_dir)
    torch.manual_seed(1)
    net = build_model(cfg, data.spec).eval()
    ev = evaluate_model(net, data, 64, torch.device("cpu"), seed=cfg.seed, absent_rates=[0.3, 1.0])
    assert list(ev.absent_acc) == ["30", "100"] and "absent_acc_30" in ev.flat()
    test = data.test
    x = {m: torch.tensor(test.features[m], dtype=torch.float32) for m in data.spec.modalities}
    with torch.no_grad():
        full = net(x).mm_logits.argmax(1).numpy()
        alone = {m: net({m: x[m]}).mm_logits.argmax(1).numpy() for m in data.spec.modalities}
    for rate in (0.3, 1.0):
        lost = missing_at_test(len(test.labels), data.spec.modalities, rate, cfg.seed, "test").missing
        pred = full.copy()
        pred[lost["audio"]] = alone["visual"][lost["audio"]]
        pred[lost["visual"]] = alone["audio"][lost["visual"]]
        assert ev.absent_acc[str(round(rate * 100))] == pytest.approx(float((pred == test.labels).mean()))
    # with zero-filled test samples (evaluation.missing_modality) the sweep is left out, not counted twice
    assert evaluate_model(net, data, 64, torch.device("cpu"), missing_modality=0.5, absent_rates=[0.3]).absent_acc == {}
