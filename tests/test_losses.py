"""FedCMI's loss terms against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedcmi.algorithms.losses import (
    Dominance,
    class_temperatures,
    decide_dominance,
    directed_dominance,
    infiltration_loss,
    ogm_coefficients,
    proximal_term,
    true_class_probs,
)


def test_true_class_probs_sums_per_class():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]])
    labels = torch.tensor([0, 0, 1])
    sums, counts = true_class_probs(logits, labels, 2)
    # softmax true-class probs: 0.5, 0.75, 0.8
    assert sums.tolist() == pytest.approx([1.25, 0.8])
    assert counts.tolist() == [2.0, 1.0]


def test_dominance_picks_the_more_confident_modality_and_reports_ratios_d_over_w():
    counts = torch.tensor([2.0, 2.0, 0.0])
    # P_0 = [0.8, 0.6, -], P_1 = [0.4, 0.6, -]  -> rho_01 = [2, 1], mean 1.5 > 1: modality 0 dominates
    d = decide_dominance((torch.tensor([1.6, 1.2, 0.0]), torch.tensor([0.8, 1.2, 0.0])), counts)
    assert d.dominant == 0
    assert d.rho.tolist() == pytest.approx([2.0, 1.0, 1.0])
    assert d.rho_bar == pytest.approx(1.5)
    # swapped inputs: modality 1 dominates and the ratios are taken the other way round
    d2 = decide_dominance((torch.tensor([0.8, 1.2, 0.0]), torch.tensor([1.6, 1.2, 0.0])), counts)
    assert d2.dominant == 1 and d2.rho_bar == pytest.approx(1.5)


def test_class_temperature_formula():
    rho = torch.tensor([3.0, 1.0, 2.0, 1.0])
    present = torch.tensor([True, True, True, False])
    dom = Dominance(0, rho, 2.0, present)
    t = class_temperatures(dom, beta=2.0, min_temperature=0.05)
    # class 0: rho/rho_bar = 1.5 -> 1 / (1 + 2 ln 1.5); class 1, 2 (equal), 3 (absent): 1
    assert t[0].item() == pytest.approx(1.0 / (1.0 + 2.0 * math.log(1.5)))
    assert t[1:].tolist() == [1.0, 1.0, 1.0]


def test_class_temperature_is_clamped():
    dom = Dominance(0, torch.tensor([1000.0, 1.0]), 1.0, torch.tensor([True, True]))
    assert class_temperatures(dom, beta=2.0, min_temperature=0.2)[0].item() == pytest.approx(0.2)


def test_infiltration_loss_is_cross_entropy_from_teacher_to_student_at_temperature():
    t = torch.tensor([[2.0, 0.0]])
    s = torch.tensor([[0.0, 1.0]], requires_grad=True)
    temp = torch.tensor([0.5])
    p_t = torch.softmax(t / 0.5, 1)
    expected = -(p_t * torch.log_softmax(s.detach() / 0.5, 1)).sum()
    loss = infiltration_loss(t, s, temp)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    # d/ds of CE(p_t, softmax(s/T)) = (softmax(s/T) - p_t) / T
    grad = (torch.softmax(s.detach() / 0.5, 1) - p_t) / 0.5
    assert torch.allclose(s.grad, grad)
    assert infiltration_loss(t, s, temp, t_squared=True).item() == pytest.approx(expected.item() * 0.25)


def test_infiltration_direction_teacher_gets_no_gradient():
    t = torch.tensor([[1.0, -1.0]], requires_grad=True)
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    infiltration_loss(t, s, torch.ones(1)).backward()
    assert t.grad is None and s.grad is not None


def test_proximal_term_value_and_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = {"w": torch.tensor([0.0, 4.0])}
    val = proximal_term([("w", w)], anchor, mu=0.1)
    assert val.item() == pytest.approx(0.05 * (1.0 + 4.0))
    val.backward()
    assert w.grad.tolist() == pytest.approx([0.1 * 1.0, 0.1 * -2.0])  # mu * (w - w_G)


def test_ogm_coefficients_slow_the_leader_only():
    c0, c1 = ogm_coefficients(8.0, 4.0, alpha=0.5)
    assert c1 == 1.0 and c0 == pytest.approx(1 - math.tanh(0.5 * 2.0))
    c0, c1 = ogm_coefficients(2.0, 6.0, alpha=0.5)
    assert c0 == 1.0 and c1 == pytest.approx(1 - math.tanh(0.5 * 3.0))


def test_directed_dominance_takes_the_ratios_the_way_it_is_told():
    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = (torch.tensor([1.6, 1.2, 0.0]), torch.tensor([0.8, 1.2, 0.0]))
    forward = directed_dominance(sums, counts, 0)
    backward = directed_dominance(sums, counts, 1)
    assert forward.rho.tolist() == pytest.approx([2.0, 1.0, 1.0])
    assert backward.dominant == 1 and backward.rho.tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert decide_dominance(sums, counts).rho.tolist() == forward.rho.tolist()


def test_warm_up_counts_local_epochs_as_the_reference_does():
    from fedcmi.algorithms.fedcmi import FedCMIOptions as FedCMIConfig

    assert FedCMIConfig(warmup_epochs=10).first_distillation_round(local_epochs=10) == 1
    assert FedCMIConfig(warmup_epochs=10).first_distillation_round(local_epochs=3) == 4
    assert FedCMIConfig(warmup_epochs=0).first_distillation_round(local_epochs=3) == 0
    assert FedCMIConfig(warmup_epochs=None, warmup_rounds=2).first_distillation_round(local_epochs=3) == 2
