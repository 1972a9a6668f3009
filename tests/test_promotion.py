"""The promotion gate: `champion` moves only when the headline improves and no single-modality path and no
absent-modality figure falls further than its tolerance; decided on a real MLflow registry (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

CHAMPION = {"mm_acc": 0.70, "path_acc_audio": 0.60, "path_acc_visual": 0.50, "absent_acc_30": 0.66,
            "absent_acc_60": 0.62}


def _cfg(tmp_path: Path, **promotion):
    return tiny_config(tmp_path, tracking={"promotion": promotion} if promotion else {})


def _tags(figures: dict) -> dict[str, str]:
    return {k: str(v) for k, v in figures.items()}


def test_a_better_headline_within_every_tolerance_is_promoted(tmp_path):
    from fedcmi.tracking.promotion import decide

    d = decide(_cfg(tmp_path), {**CHAMPION, "mm_acc": 0.72, "path_acc_visual": 0.49}, _tags(CHAMPION), "1")
    assert d.promoted and d.reason == "mm_acc 0.7200 > champion v1's 0.7000, 4 guarded figures within tolerance"
    assert {g.name for g in d.guards} == {"path_acc_audio", "path_acc_visual", "absent_acc_30", "absent_acc_60"}


def test_a_better_headline_with_a_weak_path_fallen_is_not_promoted_and_says_which(tmp_path):
    from fedcmi.tracking.promotion import decide

    cand = {**CHAMPION, "mm_acc": 0.75, "path_acc_visual": 0.40, "absent_acc_60": 0.55}
    d = decide(_cfg(tmp_path), cand, _tags(CHAMPION), "1")
    assert not d.promoted
    assert d.reason == ("mm_acc 0.7500 beats champion v1's 0.7000, but path_acc_visual 0.4000 is 0.1000 below the "
                        "champion's 0.5000 (tolerance 0.02); absent_acc_60 0.5500 is 0.0700 below the champion's "
                        "0.6200 (tolerance 0.02)")
    # each tolerance is its own setting: a looser path tolerance leaves only the absent-modality fall
    d = decide(_cfg(tmp_path, path_tolerance=0.2), cand, _tags(CHAMPION), "1")
    assert not d.promoted and "path_acc_visual" not in d.reason and "absent_acc_60" in d.reason
    assert decide(_cfg(tmp_path, path_tolerance=0.2, absent_tolerance=0.1), cand, _tags(CHAMPION), "1").promoted


def test_no_better_headline_is_not_promoted_whatever_the_paths(tmp_path):
    from fedcmi.tracking.promotion import decide

    d = decide(_cfg(tmp_path), {**CHAMPION, "path_acc_visual": 0.9}, _tags(CHAMPION), "3")
    assert not d.promoted and d.reason == "mm_acc 0.7000 <= champion v3's 0.7000"


def test_a_champion_without_guarded_figures_is_compared_by_its_headline_and_the_reason_says_so(tmp_path):
    from fedcmi.tracking.promotion import decide

    d = decide(_cfg(tmp_path), {**CHAMPION, "mm_acc": 0.71}, {"mm_acc": "0.7", "data_hash": "abc"}, "1")
    assert d.promoted and "headline only" in d.reason and d.guards == ()


def test_the_gate_settings_are_checked_at_load(tmp_path):
    from fedcmi.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.promotion.path_tolerance"):
        _cfg(tmp_path, path_tolerance=-0.1)
    with pytest.raises(ConfigError, match="tracking.promotion.absent_tolerance"):
        _cfg(tmp_path, absent_tolerance="a lot")


def _runs_with_a_model(cfg, n: int) -> list[tuple[str, str]]:
    """``n`` MLflow runs in the current tracking store, each with ``cfg``'s network logged: (run id, model uri)."""
    import mlflow

    from fedcmi.algorithms import build_model
    from fedcmi.data import DataModule
    from fedcmi.serving import ModelPackage

    data = DataModule(cfg.data.prepared_dir)
    package = ModelPackage.of(cfg, build_model(cfg, data.spec).state_dict(), data)
    runs = []
    for _ in range(n):
        with mlflow.start_run() as run:
            runs.append((run.info.run_id, package.log()))
    return runs


def test_the_registry_keeps_the_champion_when_a_path_falls_and_records_why(tiny, tmp_path):
    """Three training runs on one SQLite registry: v1 champion; v2 beats its headline but its visual path
    falls (not promoted: tag, sweep artifact, champion unchanged); v3 beats it within tolerance (promoted)."""
    import mlflow
    from mlflow import MlflowClient

    from fedcmi.tracking.model_registry import register_model

    cfg = tiny(tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "registered_model": "gate-model"})
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    try:
        runs = _runs_with_a_model(cfg, 3)
        v1 = register_model(cfg, *runs[0], CHAMPION, "data-1")
        fallen = {**CHAMPION, "mm_acc": 0.75, "path_acc_visual": 0.40}
        v2 = register_model(cfg, *runs[1], fallen, "data-1")
        v3 = register_model(cfg, *runs[2], {**CHAMPION, "mm_acc": 0.73, "path_acc_visual": 0.49}, "data-1")
        client = MlflowClient()
        tags = {int(v.version): v.tags for v in client.search_model_versions("name = 'gate-model'")}
        local = Path(mlflow.artifacts.download_artifacts(run_id=runs[1][0], artifact_path="promotion",
                                                         dst_path=str(tmp_path / "got")))
        champion = str(client.get_model_version_by_alias("gate-model", "champion").version)
    finally:
        mlflow.set_tracking_uri(None)
    assert v1["promoted"] and v1["reason"] == "no champion yet"
    assert not v2["promoted"] and v2["champion"] == 1
    assert "path_acc_visual 0.4000 is 0.1000 below the champion's 0.5000" in v2["reason"]
    assert tags[2]["promotion"] == "not promoted: " + v2["reason"]
    assert tags[2]["path_acc_visual"] == "0.4" and tags[2]["absent_acc_60"] == "0.62"
    assert v3["promoted"] and champion == "3" and tags[3]["promotion"].startswith("promoted: mm_acc 0.7300 > ")
    report = json.loads((local / "promotion.json").read_text())
    assert report["candidate"] == {"0.0": 0.75, "0.3": 0.66, "0.6": 0.62} and report["champion"]["0.0"] == 0.70
    assert [g["name"] for g in report["guards"] if g["fell"]] == ["path_acc_visual"]
    assert (local / "absent_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # registering v2 again finishes it and keeps its reason; the champion stays
    again = register_model(cfg, *runs[1], fallen, "data-1")
    assert not again["promoted"] and again["champion"] == 3 and again["version"] == 2


def test_a_champion_under_another_data_card_is_kept_and_the_reason_names_the_difference(tiny, tmp_path):
    """Two numbers are compared only under the same card: a candidate ranked by UAR never displaces a
    champion ranked by accuracy on the same data, however the figures compare."""
    import mlflow

    from fedcmi.data import DataModule
    from fedcmi.protocols import data_card
    from fedcmi.tracking.model_registry import register_model

    cfg = tiny(tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "registered_model": "card-model"})
    data = DataModule(cfg.data.prepared_dir)
    uar = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"headline_metric": "mm_uar"})})
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    try:
        runs = _runs_with_a_model(cfg, 2)
        first = register_model(cfg, *runs[0], CHAMPION, "data-1", data_card(cfg, data.spec))
        second = register_model(uar, *runs[1], {**CHAMPION, "mm_uar": 0.9}, "data-1", data_card(uar, data.spec))
    finally:
        mlflow.set_tracking_uri(None)
    assert first["promoted"] and not second["promoted"] and second["champion"] == 1
    assert second["reason"] == ("champion v1 was measured under another data card (metric: mm_acc vs mm_uar); "
                                "kept: figures are compared only under the same card")
