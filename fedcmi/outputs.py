"""The files a training leaves for DVC: the model, its history, its metrics, its curves.

:class:`TrainFiles` is the metric sink of the DVC view: once the run ends it writes ``history.json`` (every
committed round's flat record), ``curves.json`` (the curve figures every evaluated round has, as `dvc plots`
reads them), ``metrics.json`` (the final evaluation, headline first), ``curves.png`` and ``card.json`` (the
data card: protocol, classes, split, clients, metric), each atomically,
from the typed records. The model file is written by :func:`write_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.io import save_state, write_json
from fedcmi.metrics import Evaluation
from fedcmi.plots import round_curves, run_title
from fedcmi.protocols import data_card
from fedcmi.round.record import RoundRecord, curve_rows
from fedcmi.round.update import StateDict

MODEL = "model.safetensors"
HISTORY = "history.json"
METRICS = "metrics.json"
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"
#: the data card: what the figures were measured under (fedcmi.protocols.data_card)
CARD = "card.json"


def write_metrics(path: str | Path, ev: Evaluation, confusion: bool = False) -> Path:
    """An evaluation's figures as a metrics file (headline first, per-class detail last), with the confusion
    matrix when asked."""
    body: dict = dict(ev.flat())
    if confusion:
        body["confusion"] = ev.confusion
    return write_json(path, body, sort_keys=False)


def write_model(out_dir: Path, state: StateDict, cfg: Config) -> Path:
    """The final global model (the model's tensors alone)."""
    return save_state(Path(out_dir) / MODEL, state,
                      {"kind": "global", "round": cfg.federation.rounds, "algorithm": cfg.algorithm.name})


class TrainFiles:
    """The DVC files of a training in ``out_dir``."""

    def __init__(self, cfg: Config, out_dir: Path) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.paths: dict[str, Path] = {}

    def log_round(self, rec: RoundRecord) -> None:
        """Nothing until the run ends: the files are written from the committed history, whole."""

    def log_final(self, final: Evaluation, history: Sequence[RoundRecord]) -> None:
        out = self.out_dir
        self.paths["history"] = write_json(out / HISTORY, [r.to_json() for r in history])
        self.paths["metrics"] = write_metrics(out / METRICS, final)
        self.paths["curves_json"] = write_json(out / CURVES_JSON, curve_rows(list(history)))
        self.paths["curves"] = round_curves(history, self.cfg.data.modalities, out / CURVES_PNG, run_title(self.cfg))
        self.paths["card"] = write_json(out / CARD, data_card(self.cfg, DataModule(self.cfg.data.prepared_dir).spec))
