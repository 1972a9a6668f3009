"""Sample-level DP inside local training (DP-SGD with Opacus's per-example gradients): the per-example
gradients are each example's own, clipping and noise are DP-SGD's, epsilon is the accounting library's,
the methods whose losses couple examples are refused with the reason, and the run is deterministic on
every executor."""

import importlib
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from test_segments import _run_steps

from fedcmi.config import ConfigError
from fedcmi.data import DataModule
from fedcmi.federation import Federation
from fedcmi.io import load_state
from fedcmi.partition import load_partition
from fedcmi.privacy.dp_sgd import PrivateGradients, sampling
from fedcmi.runners.engine import train
from fedcmi.runners.store import MODEL, finish

DP = {"dp_sgd": {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 0.5}}

#: every method DP-SGD serves, the module whose local_sgd it calls, and the round whose loss is checked
SERVED = [
    ("fedavg", "fedavg", {}, 1),
    ("fedprox", "fedavg", {"mu": 0.1}, 1),
    ("scaffold", "fedavg", {}, 1),
    ("unimodal", "fedavg", {"modality": "audio"}, 1),
    ("ume", "ume", {}, 1),
    ("umt", "umt", {"umt": {"teacher_rounds": 1}}, 1),  # the teachers' stage
    ("umt", "umt", {"umt": {"teacher_rounds": 1}}, 2),  # the student's, toward the frozen teachers
    ("fedcmi", "fedcmi", {"fedcmi": {"infiltration": False}}, 2),
]


class _Captured(Exception):
    pass


def _loss_of(monkeypatch, fed: Federation, module: str, round_no: int, cid: int):
    """The loss function the method's client hands local SGD in round ``round_no``, with its context."""
    def capture(model, ctx, loss_fn, mu=0.0, grad_hook=None):
        raise _Captured(loss_fn, ctx)

    monkeypatch.setattr(importlib.import_module(f"fedcmi.algorithms.{module}"), "local_sgd", capture)
    fed.load(fed.initial_state())
    ctx = fed.client_context(cid, round_no)
    with pytest.raises(_Captured) as got:
        fed.strategy.train_client(fed.model, ctx)
    return got.value.args


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


#: half the clients hold one modality, and the visual encoder sees clips of two frames
MIXED = {"partition": {"multimodal_fraction": 0.5},
         "data": {"synthetic": {"frames": 2}}}


@pytest.mark.parametrize("algo, module, section, round_no", SERVED, ids=[f"{a}-r{r}" for a, _, _, r in SERVED])
def test_opacus_per_example_gradients_are_each_examples_own(tiny, monkeypatch, algo, module, section, round_no):
    """One backward pass through Opacus's hooks gives, for every example, the gradient its loss alone gives:
    the method's loss is a sum of per-example terms, and the network's layers are all hooked (a frame
    encoder's rows folded back into examples), on single-modality and multimodal clients alike."""
    cfg = tiny(algorithm={"name": algo, **section}, privacy=DP, **MIXED)
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    checked = set()
    for cid, shard in enumerate(fed.partition.clients):
        if not fed.strategy.participates(shard.modalities):
            continue
        loss_fn, ctx = _loss_of(monkeypatch, fed, module, round_no, cid)
        model = fed.model
        model.train()
        x, y = next(b for b in ctx.device_draws(0) if b is not None)
        private = PrivateGradients(model, cfg, ctx.num_examples, ctx.seed, ctx.device)
        try:
            private.begin()
            model.zero_grad(set_to_none=True)
            loss_fn(model, x, y)[0].backward()
            per_example = {n: private._per_example(n, p.grad_sample.detach(), len(y))
                           for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
        finally:
            private.close()
        assert per_example and len(y) > 1
        for i in range(len(y)):
            model.zero_grad(set_to_none=True)
            loss_fn(model, {m: v[i:i + 1] for m, v in x.items()}, y[i:i + 1])[0].backward()
            alone = _grads(model)
            assert set(alone) == set(per_example)
            for n, g in alone.items():
                assert torch.allclose(per_example[n][i], g, atol=1e-5, rtol=1e-4), (cid, n, i)
        checked.add(len(shard.modalities))
    assert checked == {1, 2}


def test_the_private_gradient_is_the_clipped_sum_over_the_expected_batch(tiny, monkeypatch):
    cfg = tiny(algorithm={"name": "fedavg"}, privacy={"dp_sgd": {"enabled": True, "noise_multiplier": 1e-9,
                                                                 "max_grad_norm": 0.05}})
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    loss_fn, ctx = _loss_of(monkeypatch, fed, "fedavg", 1, 1)
    model = fed.model
    model.train()
    x, y = next(b for b in ctx.device_draws(0) if b is not None)
    expected = torch.zeros(0)
    clipped = []
    norms = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        loss_fn(model, {m: v[i:i + 1] for m, v in x.items()}, y[i:i + 1])[0].backward()
        g = _grads(model)
        norm = torch.cat([t.flatten() for t in g.values()]).norm().item()
        norms.append(norm)
        clipped.append({n: t * min(1.0, 0.05 / (norm + 1e-6)) for n, t in g.items()})
    assert max(norms) > 0.05  # the bound bites
    rate, _ = sampling(cfg, ctx.num_examples)
    expected = {n: sum(c[n] for c in clipped) / (rate * ctx.num_examples) for n in clipped[0]}
    private = PrivateGradients(model, cfg, ctx.num_examples, ctx.seed, ctx.device)
    try:
        private.begin()
        model.zero_grad(set_to_none=True)
        loss_fn(model, x, y)[0].backward()
        private.privatize(list(model.named_parameters()), len(y))
    finally:
        private.close()
    for n, g in expected.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-6), n


def _epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_a_run_with_dp_sgd_is_deterministic_and_reports_the_librarys_epsilon(tiny, tmp_path):
    cfg = tiny(algorithm={"name": "fedavg"}, federation={"rounds": 3}, privacy=DP, **MIXED)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    plain = train(tiny_config(tmp_path, algorithm={"name": "fedavg"}, federation={"rounds": 3}, **MIXED),
                  tmp_path / "c", progress=False)
    assert not all(torch.equal(a.state[k], plain.state[k]) for k in a.state)
    part = load_partition(cfg.partition.file)
    trained = [0] * len(part.clients)
    for rec in a.history:
        for c in rec.participation.accepted:
            trained[c] += 1
        worst = 0.0
        for c, shard in enumerate(part.clients):
            q = min(1.0, cfg.federation.batch_size / shard.num_examples)
            steps = max(1, round(1 / q)) * cfg.federation.local_epochs * trained[c]
            worst = max(worst, _epsilon(q, 0.8, steps, 1e-5) if steps else 0.0)
        assert rec.server["dp_sgd_epsilon"] == pytest.approx(worst, rel=1e-9)
        assert rec.server["dp_sgd_epsilon_audio"] <= rec.server["dp_sgd_epsilon"]
    assert a.history[-1].server["dp_sgd_epsilon"] > a.history[0].server["dp_sgd_epsilon"] > 0
    # the pipeline's steps, through a store, give the same model
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "steps", per_worker=1)
    assert finish(cfg, store, tmp_path / "final.safetensors") is not None
    steps_model = load_state(store / MODEL)[0]
    assert all(torch.equal(steps_model[k], a.state[k]) for k in a.state)


@pytest.mark.parametrize("algorithm, says", [
    ({"name": "ogm_ge"}, "OGM-GE scales each encoder's gradient by a coefficient computed from the whole batch"),
    ({"name": "mmpareto"}, "MMPareto replaces the encoders' gradients"),
    ({"name": "pmr"}, "PMR's prototypes are means over all of the client's examples"),
    ({"name": "fedcmi"}, "set algorithm.fedcmi.infiltration false"),
])
def test_a_method_whose_loss_couples_examples_is_refused_with_the_reason(tmp_path, algorithm, says):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, algorithm=algorithm, privacy=DP)
    msg = str(err.value)
    assert "privacy.dp_sgd.enabled with algorithm.name" in msg and says in msg and "\n" not in msg


def test_mixed_precision_is_refused_and_fedcmi_without_infiltration_is_served(tmp_path):
    with pytest.raises(ConfigError, match="optim.precision 'bf16-mixed'"):
        tiny_config(tmp_path, algorithm={"name": "fedavg"}, optim={"precision": "bf16-mixed"}, privacy=DP)
    tiny_config(tmp_path, algorithm={"name": "fedcmi", "fedcmi": {"infiltration": False}}, privacy=DP)
    assert not any(k.startswith("privacy.dp_sgd.") and k != "privacy.dp_sgd.enabled"
                   for k in tiny_config(tmp_path).applicable())


def _changed(fed: Federation, ctx) -> tuple[set[str], dict[str, torch.Tensor], dict]:
    """Train one client from the initial model: the names of the parameters that moved, the state, metrics."""
    start = fed.initial_state()
    fed.load(start)
    update = fed.strategy.train_client(fed.model, ctx)
    moved = {n for n, _ in fed.model.named_parameters() if not torch.equal(update.state[n], start[n])}
    return moved, update.state, update.metrics


def test_an_empty_poisson_draw_is_a_step_of_noise_alone(tiny):
    # a batch size of 2 over a shard of 40 takes each example at a rate of 1/20: about one draw in eight is empty
    cfg = tiny(algorithm={"name": "fedavg"}, federation={"batch_size": 2}, privacy=DP, **MIXED)
    part = load_partition(cfg.partition.file)
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), part)
    cid = next(c for c, s in enumerate(part.clients) if len(s.modalities) == 1)
    ctx = fed.client_context(cid, 1)
    assert ctx is not None and ctx.private_batches is not None
    _, per_epoch = sampling(cfg, ctx.num_examples)
    empty = [b is None for b in ctx.private_batches(0)]
    assert len(empty) == per_epoch and any(empty)  # every draw is a step, the empty ones too
    with_data, _, metrics = _changed(fed, ctx)
    assert metrics["steps"] == per_epoch * cfg.federation.local_epochs  # as many steps as the accountant counts
    # nothing but empty draws: the parameters a step with data reaches move by noise, and only they
    only_noise = replace(ctx, private_batches=lambda epoch: iter([None, None, None]))
    moved, state, metrics = _changed(fed, only_noise)
    assert metrics["steps"] == 3
    assert moved == with_data and moved < {n for n, _ in fed.model.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in _changed(fed, only_noise)[1].items())  # seeded noise


def test_a_run_whose_draws_are_often_empty_is_deterministic_and_the_steps_give_its_model(tiny, tmp_path):
    cfg = tiny(algorithm={"name": "fedprox", "mu": 0.1}, federation={"batch_size": 1}, privacy=DP, **MIXED)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "steps", per_worker=1)
    assert finish(cfg, store, tmp_path / "final.safetensors") is not None
    steps_model = load_state(store / MODEL)[0]
    assert all(torch.equal(steps_model[k], a.state[k]) for k in a.state)
