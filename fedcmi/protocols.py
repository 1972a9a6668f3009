"""Published protocols as presets, and the data card every run carries.

A number is comparable with a published one only under the same protocol: the same class set, the same
split, the same clients and the same metric. ``protocol: <name>`` fixes those settings in one line, and
:func:`data_card` states them for every run (MLflow tags ``card.*``, ``card.json`` beside the metrics, the
registered version), so two numbers are compared only when their cards match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcmi.config import Config
    from fedcmi.data.base import DatasetSpec


@dataclass(frozen=True)
class Protocol:
    """A published protocol: the settings it fixes (dotted names) and where it comes from."""

    name: str
    source: str
    fixed: Mapping[str, Any]


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("fedcmi-cremad", "Fan et al., Balanced Multi-modal Federated Learning via Cross-Modal Infiltration, "
                 "arXiv 2401.00894: 6 emotions from the clip names, the common split lists, Dirichlet label skew, "
                 "accuracy",
                 {"data.name": "cremad", "data.cremad.labels": "clip", "data.cremad.split": "lists",
                  "partition.scheme": "dirichlet", "tracking.headline_metric": "mm_acc"}),
        Protocol("fedmultimodal-cremad", "Feng et al., FedMultimodal, KDD 2023: the raters' vote among anger, "
                 "sadness, happiness and neutral, speaker folds (fold 1 of 5 by default), one client per training "
                 "speaker, unweighted average recall",
                 {"data.name": "cremad", "data.cremad.labels": "vote4", "data.cremad.split": "speaker_folds",
                  "partition.scheme": "natural", "tracking.headline_metric": "mm_uar"}),
    )
}

_MISSING = object()


def apply_protocol(raw: dict[str, Any], default: Any) -> dict[str, Any]:
    """``raw`` settings with the protocol's fixed ones put in. A setting given with another value than the
    protocol's is refused (ValueError naming it), unless it is the setting's default (a params file lists
    every setting): the protocol then wins. ``default(dotted)`` gives a setting's default."""
    name = raw.get("protocol")
    if name is None:
        return raw
    if not isinstance(name, str) or name not in PROTOCOLS:
        raise ValueError(f"protocol: {name!r} is not a known protocol; one of {sorted(PROTOCOLS)} (or null)")
    out = json.loads(json.dumps(raw))  # a copy: the caller's dict is left as given
    for dotted, value in PROTOCOLS[name].fixed.items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        given = node.get(leaf, _MISSING)
        if given is not _MISSING and given != value and given != default(dotted):
            raise ValueError(f"{dotted} is {given!r}, but protocol {name} fixes it to {value!r}: remove the "
                             "setting, or set protocol: null to choose it yourself")
        node[leaf] = value
    return out


def data_card(cfg: Config, spec: DatasetSpec) -> dict[str, str]:
    """What a figure was measured under: the protocol, the dataset and its classes, the split, the clients
    and the headline metric."""
    from fedcmi.registry import DATASETS

    p = cfg.partition
    clients = {"iid": f"iid, {p.num_clients} clients",
               "dirichlet": f"dirichlet alpha={p.alpha:g}, {p.num_clients} clients",
               "natural": f"natural (whole groups), {p.num_clients} clients"}[p.scheme]
    return {"protocol": cfg.protocol or "custom", "dataset": cfg.data.name,
            "classes": ",".join(spec.class_names) or str(spec.num_classes),
            "split": DATASETS.get(cfg.data.name).split_card(cfg), "clients": clients,
            "metric": cfg.tracking.headline_metric}


def card_differences(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The card fields on which ``a`` and ``b`` differ, as ``field: a vs b``."""
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
