"""The resident client loader: one loader (and, with loader.workers, one set of worker processes) serves
every client epoch of a process, and feeds exactly the batches a fresh loader per epoch would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcmi.data import DataModule
from fedcmi.data.base import ResidentLoader, batch_loader
from fedcmi.runners.engine import train


def _same(a, b) -> bool:
    (xa, ya), (xb, yb) = a, b
    return set(xa) == set(xb) and all(torch.equal(xa[m], xb[m]) for m in xa) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resident_loader_feeds_each_client_the_batches_of_a_fresh_one(tiny, workers):
    cfg = tiny()
    dm = DataModule(cfg.data.prepared_dir)
    mods = dm.spec.modalities
    resident = ResidentLoader(dm.train, mods, workers=workers)
    rng = np.random.default_rng(0)
    requests = [(np.sort(rng.choice(len(dm.train), 37, replace=False)), held, seed)
                for seed, held in enumerate([mods, mods[:1], mods[1:], mods, mods[:1]])]
    for rows, held, seed in requests:
        fresh = list(batch_loader(dm.train, rows, held, 8, seed))
        served = list(resident.batches(rows, held, 8, seed))
        assert len(served) == len(fresh) == 5
        assert all(_same(a, b) for a, b in zip(served, fresh, strict=True)), (held, seed)
    # an epoch left after one batch (a client that failed): the next request is served whole and right
    it = resident.batches(requests[0][0], mods, 8, 0)
    next(it)
    rows, held, seed = requests[1]
    assert all(_same(a, b) for a, b in zip(resident.batches(rows, held, 8, seed),
                                           batch_loader(dm.train, rows, held, 8, seed), strict=True))


def test_loader_workers_never_change_the_model(tiny, tmp_path):
    """Clients of two modalities and single-modality ones, two rounds: the resident loader's worker
    processes read the batches, and the model is the one trained with no loader workers, bit for bit."""
    cfg = tiny(partition={"multimodal_fraction": 0.5}, federation={"clients_per_round": 4})
    alone = train(cfg, tmp_path / "w0", progress=False)
    two = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"workers": 2})})
    read = train(two, tmp_path / "w2", progress=False)
    assert all(torch.equal(alone.state[k], read.state[k]) for k in alone.state)
