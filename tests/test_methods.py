"""The methods beyond FedCMI: each one's characteristic term on tiny tensors, and each one through the
engine, a resumed run and the pipeline's steps, bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedcmi.algorithms.mmpareto import min_norm_weight, pareto_combine
from fedcmi.algorithms.pmr import (
    class_prototypes,
    prototype_entropy,
    prototype_logits,
    prototype_score,
    rebalance_weights,
)
from fedcmi.algorithms.ume import ensemble_loss
from fedcmi.algorithms.umt import feature_distillation
from fedcmi.config import ConfigError, ServerConfig, config_from_dict
from fedcmi.federation import Federation
from fedcmi.io import load_state
from fedcmi.round.client_state import SERVER_CONTROL, ControlVariates, client_control_prefix
from fedcmi.round.server_optimizer import server_step
from fedcmi.round.stage import ServerState
from fedcmi.round.update import AUX, ClientUpdate, UpdateRejected
from fedcmi.runners.engine import train

NEW = ["pmr", "umt", "ume", "mmpareto", "fedavgm", "fedadam", "scaffold"]


# -- PMR ------------------------------------------------------------------------------------------
def test_pmr_prototypes_are_class_means_and_absent_classes_leave_the_softmax():
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    protos, present = class_prototypes(h, y, 3)
    assert torch.allclose(protos, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 4.0]]))
    assert present.tolist() == [True, False, True]
    logits = prototype_logits(h, protos, present)
    assert torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, [0, 2]]).all()
    assert logits[0, 0] == -1.0 and logits[2, 2] == 0.0  # -||h - p||^2
    assert prototype_score(logits, y) <= 3.0


def test_pmr_prototypical_loss_has_a_finite_gradient_when_a_sample_sits_on_its_prototype():
    h = torch.tensor([[1.0, 2.0]], requires_grad=True)
    protos, present = class_prototypes(h.detach(), torch.tensor([0]), 2)
    present = torch.tensor([True, True])
    loss = F.cross_entropy(prototype_logits(h, protos, present), torch.tensor([0]))
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_pmr_accelerates_only_the_lagging_modality_in_proportion_to_the_gap():
    lead, w = rebalance_weights(3.0, 1.5, alpha=2.0)
    assert lead == 0 and w == pytest.approx(2.0 * (3.0 / 1.5 - 1))
    lead, w = rebalance_weights(1.0, 4.0, alpha=1.0)
    assert lead == 1 and w == pytest.approx(3.0)
    assert rebalance_weights(2.0, 2.0, alpha=1.0)[1] == 0.0  # balanced: no extra term


def test_pmr_entropy_is_that_of_the_prototype_softmax():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert float(prototype_entropy(logits)) == pytest.approx(math.log(2))


# -- MMPareto ----------------------------------------------------------------------------------------
def test_mmpareto_min_norm_weight_is_the_minimum_of_the_segment():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])
    w = min_norm_weight(g1, g2)
    grid = torch.linspace(0, 1, 10001)
    norms = torch.stack([(a * g1 + (1 - a) * g2).norm() for a in grid])
    assert w == pytest.approx(float(grid[norms.argmin()]), abs=1e-3)


def test_mmpareto_conflicting_gradients_give_a_direction_that_harms_neither_loss():
    g_mm, g_uni = torch.tensor([1.0, 0.2]), torch.tensor([-0.8, 1.0])
    out, conflict = pareto_combine(g_mm, g_uni)
    assert conflict
    assert float(out @ g_mm) >= -1e-6 and float(out @ g_uni) >= -1e-6  # a descent direction for both
    assert float(out.norm()) == pytest.approx(float(g_mm.norm() + g_uni.norm()), rel=1e-5)
    # the plain sum the multitask baseline steps along would raise the multimodal loss here
    assert float((g_mm + g_uni) @ g_mm) < float(out @ g_mm) or float((g_mm + g_uni) @ g_uni) < 0


def test_mmpareto_agreeing_gradients_keep_the_mean_direction_at_the_summed_length():
    g_mm, g_uni = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    out, conflict = pareto_combine(g_mm, g_uni)
    assert not conflict
    mean = (g_mm + g_uni) / 2
    assert torch.allclose(out / out.norm(), mean / mean.norm())
    assert float(out.norm()) == pytest.approx(1.0 + math.sqrt(2))


# -- UME / UMT ---------------------------------------------------------------------------------------
def test_ume_trains_each_modality_on_its_own_loss_and_predicts_their_sum():
    from fedcmi.models.networks import EnsembleNet

    torch.manual_seed(0)
    net = EnsembleNet(("a", "b"), {"a": (5,), "b": (7,)}, {"a": "mlp", "b": "mlp"}, 3, 4, 2)
    x = {"a": torch.randn(6, 5), "b": torch.randn(6, 7)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = net(x)
    assert torch.allclose(out.mm_logits, out.uni_logits["a"] + out.uni_logits["b"])

    def grad_a(xb: torch.Tensor) -> torch.Tensor:
        net.zero_grad()
        loss, terms = ensemble_loss(net({"a": x["a"], "b": xb}).uni_logits, y)
        loss.backward()
        assert set(terms) == {"ce_a", "ce_b"}
        return net.encoders["a"].net[1].weight.grad.clone()

    # the weak modality's input never reaches the strong encoder's gradient (it would, through the
    # cross-entropy of the summed logits)
    assert torch.equal(grad_a(x["b"]), grad_a(torch.randn(6, 7)))


def test_umt_distillation_pulls_each_student_encoder_to_its_teacher():
    s = {"a": torch.zeros(2, 3, requires_grad=True), "b": torch.ones(2, 3, requires_grad=True)}
    t = {"a": torch.ones(2, 3), "b": torch.ones(2, 3)}
    loss = feature_distillation(s, t)
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()
    assert s["a"].grad is not None and float(s["a"].grad.sum()) < 0 and float(s["b"].grad.abs().sum()) == 0


# -- the server step and SCAFFOLD's server side --------------------------------------------------
def test_fedavgm_and_fedadam_steps_by_hand():
    old = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    agg = {"w": torch.tensor([0.5, 2.5]), "n": torch.tensor(4)}
    same, aux = server_step(ServerConfig(), "none", old, agg, {})
    assert same is not agg and torch.equal(same["w"], agg["w"]) and aux == {}
    srv = ServerConfig(lr=0.5, momentum=0.9)
    x1, aux = server_step(srv, "momentum", old, agg, {})
    delta = torch.tensor([0.5, -0.5], dtype=torch.float64)
    assert torch.allclose(x1["w"].double(), old["w"].double() - 0.5 * delta)
    assert torch.equal(x1["n"], agg["n"])  # integer buffers take the aggregate
    x2, aux = server_step(srv, "momentum", x1, agg, aux)
    m2 = 0.9 * delta + (x1["w"].double() - agg["w"].double())
    assert torch.allclose(x2["w"].double(), x1["w"].double() - 0.5 * m2)
    adam = ServerConfig(lr=0.1, betas=(0.9, 0.99), tau=1e-3)
    y1, aux = server_step(adam, "adam", old, agg, {})
    m, v = 0.1 * delta, 0.01 * delta ** 2
    assert torch.allclose(y1["w"].double(), old["w"].double() - 0.1 * m / (v.sqrt() + 1e-3), atol=1e-6)
    assert set(aux) == {AUX + "server/m/w", AUX + "server/v/w"}


def test_scaffold_server_keeps_each_clients_variate_and_moves_c_by_the_mean_change_over_all_clients():
    shapes = {"w": torch.Size([2])}
    old_ci = torch.tensor([1.0, 1.0], dtype=torch.float64)
    aux = {client_control_prefix(3) + "w": old_ci, SERVER_CONTROL + "w": torch.tensor([0.5, 0.5], dtype=torch.float64)}
    cv = ControlVariates(shapes, num_clients=4, aux=aux, lr=0.1)
    u3 = ClientUpdate(3, {}, 1, ("a",), extra={"w": torch.tensor([3.0, 1.0])}, change=1.0)
    u5 = ClientUpdate(5, {}, 1, ("a",), extra={"w": torch.tensor([0.0, 4.0])}, change=1.0)
    for u in (u3, u5):
        cv.admit(u.client_id, u)
        cv.accept(u)
    out = cv.conclude(ServerState({}, {}, aux)).aux
    assert torch.equal(out[client_control_prefix(5) + "w"], torch.tensor([0.0, 4.0], dtype=torch.float64))
    change = (torch.tensor([3.0, 1.0]) - old_ci) + torch.tensor([0.0, 4.0])
    assert torch.allclose(out[SERVER_CONTROL + "w"], torch.tensor([0.5, 0.5], dtype=torch.float64) + change / 4)
    for bad in ({}, {"w": torch.tensor([float("nan"), 0.0])}, {"w": torch.zeros(3)}):
        with pytest.raises(UpdateRejected, match="control variate"):
            cv.admit(1, ClientUpdate(1, {}, 1, ("a",), extra=bad, change=1.0))
    # finite but far beyond what SCAFFOLD's rule gives for its change: refused, c untouched
    with pytest.raises(UpdateRejected, match="control variates moved by 1.414e\\+30, more than its own change allows"):
        cv.admit(1, ClientUpdate(1, {}, 1, ("a",), extra={"w": torch.full((2,), 1e30)}, change=1.0))


def test_scaffold_client_variate_is_the_mean_raw_gradient_under_plain_sgd(tiny):
    """Option II with momentum and weight decay off: c_i+ = c_i - c + (x - y) / (K lr) = mean of the raw
    gradients, whatever c and c_i were (the correction c - c_i moves y but cancels out of c_i+)."""
    from fedcmi.algorithms.base import ClientContext, cross_entropy, local_sgd

    cfg = tiny(optim={"momentum": 0.0, "weight_decay": 0.0}, algorithm={"name": "scaffold"})
    fed = Federation(cfg, *_data(cfg))
    ctx = fed.client_context(0, 1)
    assert isinstance(ctx, ClientContext)
    names = [n for n, _ in fed.model.named_parameters()]
    c = {n: torch.full_like(p, 0.01, dtype=torch.float64) for n, p in fed.model.named_parameters()}
    ci = {n: torch.full_like(p, -0.02, dtype=torch.float64) for n, p in fed.model.named_parameters()}
    start = {k: v.clone() for k, v in fed.model.state_dict().items()}
    grads: dict[str, torch.Tensor] = {}

    def recording(m, x, y):
        loss, terms = cross_entropy(m, x, y)
        raw = torch.autograd.grad(loss, [p for _, p in m.named_parameters()], retain_graph=True,
                                  allow_unused=True)
        for n, g in zip(names, raw, strict=True):
            if g is not None:
                grads[n] = grads.get(n, 0) + g.double()
        return loss, terms

    ctx.control = (c, ci)
    torch.manual_seed(0)
    metrics = local_sgd(fed.model, ctx, recording)
    assert ctx.control_out is not None
    steps = metrics["steps"]
    for n in names:
        assert torch.allclose(ctx.control_out[n], grads[n] / steps, atol=1e-5), n
    # the correction is there: without it the client would have ended elsewhere
    fed.model.load_state_dict(start)
    ctx.control, ctx.control_out = None, None
    torch.manual_seed(0)
    local_sgd(fed.model, ctx, cross_entropy)
    assert fed.model.state_dict().keys() == start.keys()
    moved = {k: v.clone() for k, v in fed.model.state_dict().items()}
    fed.model.load_state_dict(start)
    ctx.control = (c, ci)
    torch.manual_seed(0)
    local_sgd(fed.model, ctx, cross_entropy)
    assert any(not torch.equal(moved[k], v) for k, v in fed.model.state_dict().items())


def _data(cfg):
    from fedcmi.data import DataModule
    from fedcmi.partition import load_partition

    return DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file)


# -- each method's characteristic term changes the client's update -------------------------------------
def _update(cfg, cid: int, rnd: int = 2) -> dict[str, torch.Tensor]:
    fed = Federation(cfg, *_data(cfg))
    u = fed.train_client(fed.initial_state(), cid, rnd)
    assert u is not None
    return u.state


def _multimodal_client(cfg) -> int:
    _, part = _data(cfg)
    return next(c.id for c in part.clients if c.multimodal)


@pytest.mark.parametrize("name, without, with_", [
    ("pmr", {"pmr": {"alpha": 0.0, "entropy_weight": 0.0}}, {"pmr": {"entropy_weight": 0.0}}),  # PCE alone
    ("pmr", {"pmr": {"alpha": 0.0, "entropy_weight": 0.0}}, {"pmr": {"alpha": 0.0}}),  # entropy alone
    ("umt", {"umt": {"teacher_rounds": 1, "distill_weight": 0.0}}, {"umt": {"teacher_rounds": 1}}),
])
def test_without_its_term_the_method_is_fedavg_and_with_it_it_is_not(tiny, name, without, with_):
    base = {"partition": {"multimodal_fraction": 0.5}, "federation": {"rounds": 3}}
    plain = tiny(**base, algorithm={"name": name, **without})
    cid = _multimodal_client(plain)
    off = _update(plain, cid)
    on = _update(tiny(**base, algorithm={"name": name, **with_}), cid)
    assert any(not torch.equal(on[k], off[k]) for k in on), "the characteristic term changed nothing"
    if name == "pmr":  # with the term off, PMR's client is FedAvg's, bitwise
        fedavg = _update(tiny(**base, algorithm={"name": "fedavg"}), cid)
        assert all(torch.equal(fedavg[k], off[k]) for k in off)


def test_umt_trains_teachers_first_then_only_the_student(tiny):
    cfg = tiny(partition={"multimodal_fraction": 0.5}, federation={"rounds": 3},
               algorithm={"name": "umt", "umt": {"teacher_rounds": 1}})
    cid = _multimodal_client(cfg)
    fed = Federation(cfg, *_data(cfg))
    start = fed.initial_state()
    teach = fed.train_client(start, cid, 1)
    student = fed.train_client(start, cid, 2)
    assert teach is not None and student is not None

    def moved(u, prefix):
        return [k for k in start if k.startswith(prefix) and not torch.equal(u.state[k], start[k])]

    assert moved(teach, ("teachers.", "classifiers.")) and not moved(teach, ("encoders.", "fusion."))
    assert moved(student, ("encoders.", "fusion.")) and not moved(student, ("teachers.", "classifiers."))


def test_mmpareto_without_the_pareto_combination_is_the_plain_multitask_sum(tiny, monkeypatch):
    import fedcmi.algorithms.mmpareto as mp

    cfg = tiny(partition={"multimodal_fraction": 0.5}, algorithm={"name": "mmpareto"})
    cid = _multimodal_client(cfg)
    pareto = _update(cfg, cid)
    monkeypatch.setattr(mp, "pareto_combine", lambda g1, g2: (g1 + g2, False))
    plain = _update(cfg, cid)
    assert any(not torch.equal(pareto[k], plain[k]) for k in pareto), "the Pareto combination changed nothing"


# -- through the engine, a resumed run and the pipeline's steps ----------------------------------------
def _settings(name: str) -> dict:
    algo: dict = {"name": name}
    if name == "umt":
        algo["umt"] = {"teacher_rounds": 1}
    return {"partition": {"multimodal_fraction": 0.5}, "federation": {"rounds": 3, "clients_per_round": 3},
            "algorithm": algo}


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [*NEW, "fedcmi+scaffold+momentum"])
def test_each_method_resumes_bitwise_and_its_pipeline_steps_equal_the_engine(tiny, tmp_path, name):
    from test_segments import _run_steps

    from fedcmi.runners.store import MODEL

    if name == "fedcmi+scaffold+momentum":  # SCAFFOLD and a server optimiser on FedCMI's client update
        settings = _settings("fedcmi")
        settings["algorithm"]["control_variates"] = True
        settings["server"] = {"optimizer": "momentum"}
    else:
        settings = _settings(name)
    cfg = tiny(**settings)
    whole = train(cfg, tmp_path / "whole", progress=False)
    assert len(whole.history) == 3 and not any(k.startswith(AUX) for k in whole.state)

    two = config_from_dict({**cfg.to_dict(), "federation": {**cfg.to_dict()["federation"], "rounds": 2}})
    train(two, tmp_path / "resumed", progress=False)  # what a run killed after round 2 leaves
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from == 2 and _same(resumed.state, whole.state), "resume is not bitwise"
    timeless = [{k: v for k, v in h.to_json().items() if k != "seconds"} for h in whole.history]
    assert [{k: v for k, v in h.to_json().items() if k != "seconds"} for h in resumed.history] == timeless

    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "a", per_worker=2, rounds=range(1, 3))  # one pipeline run of two rounds
    _run_steps(cfg, store, tmp_path / "b", per_worker=2)  # the next run reads the state the first left
    from fedcmi.runners.store import finish

    finish(cfg, store, tmp_path / "final.safetensors")
    state, _ = load_state(store / MODEL)
    assert _same(state, whole.state), "the pipeline's steps differ from the engine"

    ckpt, _ = load_state(sorted((tmp_path / "whole" / "checkpoints").glob("round_*.safetensors"))[-1])
    stateful = name in ("fedavgm", "fedadam", "scaffold", "fedcmi+scaffold+momentum")
    assert any(k.startswith(AUX) for k in ckpt) == stateful  # the server's state lives in the checkpoint
    if name in ("scaffold", "fedcmi+scaffold+momentum"):
        kept = {k.split("/")[3] for k in ckpt if k.startswith(AUX + "control/client/")}
        trained = {c for h in whole.history for c in h.participation.accepted}
        assert kept == {str(c) for c in trained}  # every client that trained left its variate


@pytest.mark.parametrize("change, says", [
    ({"algorithm": {"name": "fedavgm"}, "server": {"optimizer": "adam"}}, "server.optimizer 'adam' contradicts"),
    ({"algorithm": {"name": "scaffold", "control_variates": False}}, "algorithm.control_variates cannot be false"),
    ({"algorithm": {"name": "umt", "umt": {"teacher_rounds": 20}}}, "algorithm.umt.teacher_rounds"),
    ({"server": {"betas": [0.9, 1.0]}}, "server.betas"),
    ({"server": {"lr": 0}}, "server.lr"),
    ({"server": {"optimizer": "sgd"}}, "server.optimizer"),
    ({"algorithm": {"pmr": {"alpha": -1}}}, "algorithm.pmr.alpha"),
    ({"partition": {"faults": {"missing_labels": 1.0}}}, "partition.faults.missing_labels"),
    ({"evaluation": {"missing_modality": 1.5}}, "evaluation.missing_modality"),
])
def test_bad_settings_of_the_new_methods_are_one_clear_error(tmp_path, change, says):
    from conftest import merge, tiny_config

    with pytest.raises((ConfigError, ValueError), match=says.replace(".", r"\.").replace("(", r"\(")):
        tiny_config(tmp_path, **merge({}, change))


def test_server_optimizer_combines_with_another_algorithm_and_auto_means_the_algorithms_own(tmp_path):
    from conftest import tiny_config

    assert tiny_config(tmp_path, algorithm={"name": "fedadam"}).server_optimizer == "adam"
    assert tiny_config(tmp_path, algorithm={"name": "fedcmi"}).server_optimizer == "none"
    assert tiny_config(tmp_path, algorithm={"name": "ogm_ge"}, server={"optimizer": "momentum"}).server_optimizer \
        == "momentum"
    assert tiny_config(tmp_path, algorithm={"name": "scaffold"}).control_variates
    assert not tiny_config(tmp_path, algorithm={"name": "fedavg"}).control_variates


# -- the command line under kill -9, and the Kubeflow pipeline, with state that survives rounds -----------
@pytest.mark.slow
def test_kill_9_inside_a_client_with_client_and_server_state_resumes_to_the_uninterrupted_model(tmp_path):
    """SCAFFOLD's client variates and FedAdam's moments (``server.optimizer: adam``) are both state the
    next round reads: a run killed inside a client of round 2 resumes from round 1's checkpoint, and ends
    bitwise where the uninterrupted run ends."""
    import json
    import signal

    from faults import fedcmi_project, run_cli

    from fedcmi.config import load_config
    from fedcmi.round.schedule import sample_clients

    project = fedcmi_project(tmp_path, rounds=3)
    sets = ["--set", "algorithm.name=scaffold", "--set", "server.optimizer=adam", "--no-progress"]
    r = run_cli(["train", *sets, "--set", "output.dir=outputs/whole"], project)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = load_config(project / "params.yaml", ["algorithm.name=scaffold", "server.optimizer=adam"])
    victim = sample_clients(cfg, 2)[-1]
    r = run_cli(["train", *sets, "--set", "output.dir=outputs/killed"], project,
                {"kind": "kill_client", "round": 2, "client": victim})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = run_cli(["train", *sets, "--set", "output.dir=outputs/killed", "--resume", "must"], project)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["resumed_from_round"] == 1
    a, _ = load_state(project / "outputs/whole/train/model.safetensors")
    b, _ = load_state(project / "outputs/killed/train/model.safetensors")
    assert _same(a, b) and not any(k.startswith(AUX) for k in a)
    ca, _ = load_state(project / "outputs/whole/train/checkpoints/round_00003.safetensors")
    cb, _ = load_state(project / "outputs/killed/train/checkpoints/round_00003.safetensors")
    assert _same(ca, cb) and any(k.startswith(AUX + "control/client/") for k in ca)
    assert any(k.startswith(AUX + "server/v/") for k in ca)


@pytest.mark.slow
def test_scaffold_through_a_local_kubeflow_run_in_two_runs_equals_the_engine(tmp_path):
    """The pipeline passes the global state (model, server moments, every client's variate) from round to
    round and from run to run as its artifact; the final model is the engine's, bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import TINY, merge

    from fedcmi.data import DataModule, prepare
    from fedcmi.partition import make_partition, save_partition

    root = Path(__file__).resolve().parents[1]
    raw = merge(merge(yaml.safe_load((root / "params.yaml").read_text()), TINY), _settings("scaffold"))
    raw["server"]["optimizer"] = "momentum"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
        engine = train(cfg, tmp_path / "engine", progress=False)
    finally:
        os.chdir(cwd)
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "fedcmi.cli", "pipeline", "run-local", "--rounds-per-run", "2",
                        "--clients-per-pod", "2", "--out", "pipe.safetensors",
                        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    state, _ = load_state(tmp_path / "pipe.safetensors")
    assert _same(state, engine.state), "the Kubeflow run differs from the engine"
