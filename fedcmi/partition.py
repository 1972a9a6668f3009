"""Splitting the training set across clients, and the partition file.

Each partitioner has one job: :class:`IidPartitioner` and
:class:`DirichletPartitioner` decide which samples a client holds,
:class:`ModalityAssigner` which modalities it holds. All are seeded; a
:class:`Partition` refuses to exist if it loses or duplicates a sample or
leaves a client below the minimum size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcmi.config import Config
from fedcmi.data.faults import FAULT_STREAM, ClientFaults, SampleFaults, draw_client_faults, split_faults
from fedcmi.errors import FedcmiError
from fedcmi.io import is_int, read_json, write_json

FORMAT = "fedcmi-partition/1"
MAX_SAMPLES = 10**9  # far above any dataset here, far below an allocation that would take the machine down


class PartitionError(FedcmiError, ValueError):
    """A partition that cannot be made, or a partition file that is invalid."""


@dataclass(frozen=True)
class ClientShard:
    id: int
    indices: np.ndarray
    modalities: tuple[str, ...]
    class_histogram: tuple[int, ...]
    faults: ClientFaults = field(default_factory=ClientFaults.none)

    @property
    def labelled(self) -> np.ndarray:
        """The samples it trains on: its indices without the unlabelled ones."""
        if not len(self.faults.unlabeled):
            return self.indices
        return np.setdiff1d(self.indices, self.faults.unlabeled, assume_unique=True)

    @property
    def num_examples(self) -> int:
        """Samples it trains on (its weight in FedAvg)."""
        return int(len(self.indices) - len(self.faults.unlabeled))

    @property
    def multimodal(self) -> bool:
        return len(self.modalities) > 1


@dataclass(frozen=True)
class Partition:
    clients: tuple[ClientShard, ...]
    num_samples: int
    num_classes: int
    modalities: tuple[str, str]
    meta: dict

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, min_samples: int = 1) -> None:
        if not self.clients:
            raise PartitionError("a partition needs at least one client")
        if [c.id for c in self.clients] != list(range(len(self.clients))):
            raise PartitionError("client ids must be 0..n-1 in order")
        allidx = np.concatenate([c.indices for c in self.clients]) if self.clients else np.array([], int)
        counts = np.bincount(allidx, minlength=self.num_samples) if len(allidx) else np.zeros(self.num_samples)
        if len(counts) > self.num_samples or (len(allidx) and allidx.min() < 0):
            raise PartitionError(f"partition holds indices outside 0..{self.num_samples - 1}")
        if (counts > 1).any():
            raise PartitionError(f"partition duplicates {int((counts > 1).sum())} sample(s)")
        if (counts == 0).any():
            raise PartitionError(f"partition loses {int((counts == 0).sum())} sample(s)")
        small = [c.id for c in self.clients if len(c.indices) < min_samples]
        if small:
            raise PartitionError(f"client(s) {small} hold fewer than {min_samples} samples")
        for c in self.clients:
            if not c.modalities or not set(c.modalities) <= set(self.modalities):
                raise PartitionError(f"client {c.id} has modalities {c.modalities}, not a subset of {self.modalities}")
            if len(set(c.modalities)) != len(c.modalities):  # ["audio", "audio"] would count as multimodal
                raise PartitionError(f"client {c.id} lists a modality twice: {list(c.modalities)}")

    def sample_faults(self, labels: np.ndarray) -> SampleFaults | None:
        """The training split's faults as the batch reader applies them (None when the partition has none)."""
        return split_faults([c.faults for c in self.clients], labels, self.modalities)

    def client(self, cid: int) -> ClientShard:
        if not 0 <= cid < len(self.clients):
            raise PartitionError(f"client {cid} does not exist (the partition has {len(self.clients)} clients)")
        return self.clients[cid]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "modalities": list(self.modalities),
            "meta": self.meta,
            "clients": [
                {
                    "id": c.id,
                    "modalities": list(c.modalities),
                    "num_examples": c.num_examples,
                    "class_histogram": list(c.class_histogram),
                    "indices": c.indices.tolist(),
                    **({} if c.faults.empty else {"faults": {
                        "missing": {m: v.tolist() for m, v in c.faults.missing.items()},
                        "noisy_labels": c.faults.noisy.tolist(),
                        "unlabeled": c.faults.unlabeled.tolist()}}),
                }
                for c in self.clients
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> Partition:
        """A partition from its JSON form, every field checked before anything is allocated: a sample
        count must match the clients' indices, every index is an integer in range (a float is never
        truncated into one), so a damaged file is one :class:`PartitionError`."""
        if d.get("format") != FORMAT:
            raise PartitionError(f"not a partition file (format {d.get('format')!r}, expected {FORMAT!r})")
        n, k, mods, raw_clients = d.get("num_samples"), d.get("num_classes"), d.get("modalities"), d.get("clients")
        if not is_int(n) or not 0 < n <= MAX_SAMPLES:
            raise PartitionError(f"num_samples {n!r} is not a sample count")
        if not is_int(k) or not 1 < k <= MAX_SAMPLES:
            raise PartitionError(f"num_classes {k!r} is not a class count")
        if not isinstance(mods, list) or len(mods) != 2 or not all(isinstance(m, str) for m in mods):
            raise PartitionError(f"modalities {mods!r} are not two names")
        if not isinstance(raw_clients, list) or not raw_clients:
            raise PartitionError("clients must be a non-empty list")
        total = sum(len(c.get("indices", ())) if isinstance(c, dict) else 0 for c in raw_clients)
        if total != n:
            raise PartitionError(f"the clients hold {total} indices, num_samples says {n}")
        clients = []
        for pos, c in enumerate(raw_clients):
            if not isinstance(c, dict):
                raise PartitionError(f"client #{pos} is not an object")
            idx, cm, hist = c.get("indices"), c.get("modalities"), c.get("class_histogram")
            if not isinstance(idx, list) or not all(is_int(i) and 0 <= i < n for i in idx):
                raise PartitionError(f"client #{pos}: indices must be integers in 0..{n - 1}")
            if not isinstance(cm, list) or not all(isinstance(m, str) for m in cm):
                raise PartitionError(f"client #{pos}: modalities must be a list of names")
            if not isinstance(hist, list) or len(hist) != k or not all(is_int(h) and h >= 0 for h in hist):
                raise PartitionError(f"client #{pos}: class_histogram must be {k} counts")
            if not is_int(c.get("id")):
                raise PartitionError(f"client #{pos}: id {c.get('id')!r} is not an integer")
            indices = np.asarray(idx, dtype=np.int64)
            faults = _read_faults(c.get("faults"), pos, indices, tuple(cm), k)
            clients.append(ClientShard(c["id"], indices, tuple(cm), tuple(hist), faults))
        meta = d.get("meta", {})
        return cls(tuple(clients), n, k, (mods[0], mods[1]), meta if isinstance(meta, dict) else {})

    def stats(self) -> dict:
        """Per-client statistics, as logged and plotted."""
        sizes = np.array([c.num_examples for c in self.clients])
        kinds: dict[str, int] = {}
        for c in self.clients:
            key = "+".join(c.modalities)
            kinds[key] = kinds.get(key, 0) + 1
        return {
            "num_clients": len(self.clients),
            "size_min": int(sizes.min()),
            "size_max": int(sizes.max()),
            "size_mean": float(sizes.mean()),
            "clients_by_modalities": kinds,
            "faults": {k: sum(c.faults.counts()[k] for c in self.clients) for k in ClientFaults.none().counts()},
            "per_client": [
                {"id": c.id, "num_examples": c.num_examples, "modalities": list(c.modalities),
                 "class_histogram": list(c.class_histogram), "faults": c.faults.counts()}
                for c in self.clients
            ],
        }


class IidPartitioner:
    """Shuffle and deal samples into near-equal shares."""

    def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        if num_clients > len(labels):
            raise PartitionError(f"{num_clients} clients but only {len(labels)} samples")
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), num_clients)]


class DirichletPartitioner:
    """Per-class Dirichlet(alpha) label skew with an optional per-client cap.

    For each class, client proportions are drawn from Dir(alpha); clients that
    have reached the cap (``cap_factor * N / num_clients``) get no more. Draws
    that leave a client below ``min_samples`` are redrawn, up to
    ``max_attempts`` times.
    """

    def __init__(self, alpha: float, cap_factor: float | None, min_samples: int, max_attempts: int = 100) -> None:
        if alpha <= 0:
            raise PartitionError(f"alpha must be positive, got {alpha}")
        if cap_factor is not None and cap_factor <= 1:
            raise PartitionError(f"the cap factor must exceed 1, got {cap_factor}")
        self.alpha, self.cap_factor, self.min_samples, self.max_attempts = alpha, cap_factor, min_samples, max_attempts

    def _once(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(labels)
        cap = self.cap_factor * n / num_clients if self.cap_factor else np.inf
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, self.alpha))
            open_ = np.array([len(s) < cap for s in shares], dtype=float)
            if open_.sum() == 0:
                open_[:] = 1.0
            p = p * open_
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for share, part in zip(shares, np.split(idx, cuts), strict=True):
                share.extend(part.tolist())
        return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]

    def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        if num_clients * self.min_samples > len(labels):
            raise PartitionError(
                f"{num_clients} clients x min_samples {self.min_samples} exceeds the {len(labels)} training samples"
            )
        for _ in range(self.max_attempts):
            shares = self._once(labels, num_clients, rng)
            if min(len(s) for s in shares) >= self.min_samples:
                return shares
        raise PartitionError(
            f"no Dirichlet(alpha={self.alpha}) draw in {self.max_attempts} attempts gave every client "
            f"at least {self.min_samples} samples; raise partition.alpha, lower partition.min_samples "
            "or partition.num_clients"
        )


class NaturalPartitioner:
    """Clients as the data's own groups (a speaker, a site): each client holds whole groups. With as many
    clients as groups, client ``i`` is the ``i``-th group id in sorted order; with fewer, the groups are
    dealt in a seeded order, each to the client holding the fewest samples so far."""

    def __init__(self, groups: np.ndarray | None, min_samples: int) -> None:
        if groups is None:
            raise PartitionError(
                "partition.scheme: natural needs a group id per training sample, and the prepared data has none; "
                "CREMA-D records each clip's actor, and an npz dataset takes an integer array 'group' in every "
                "file: add it and rerun `fedcmi prepare`, or choose partition.scheme iid or dirichlet")
        self.groups, self.min_samples = np.asarray(groups), min_samples

    def split(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        ids, inverse, counts = np.unique(self.groups, return_inverse=True, return_counts=True)
        if num_clients > len(ids):
            raise PartitionError(f"partition.num_clients={num_clients}, but the training split holds {len(ids)} "
                                 f"groups and a natural split gives each client whole groups: set "
                                 f"partition.num_clients to {len(ids)} (one client per group) or fewer")
        if num_clients == len(ids):
            owner = np.arange(len(ids))
        else:
            owner = np.empty(len(ids), dtype=np.int64)
            load = np.zeros(num_clients, dtype=np.int64)
            for g in rng.permutation(len(ids)):
                owner[g] = int(np.argmin(load))
                load[owner[g]] += counts[g]
        shares = [np.flatnonzero(owner[inverse] == c).astype(np.int64) for c in range(num_clients)]
        small = [(c, len(s)) for c, s in enumerate(shares) if len(s) < self.min_samples]
        if small:
            which = ", ".join(f"client {c} (group {', '.join(str(ids[g]) for g in np.flatnonzero(owner == c))}: "
                              f"{n} samples)" for c, n in small[:3])
            raise PartitionError(f"{len(small)} clients hold fewer than partition.min_samples={self.min_samples} "
                                 f"samples: {which}; lower partition.min_samples or partition.num_clients")
        return shares


class ModalityAssigner:
    """A fraction of clients keep both modalities; the rest split between the two."""

    def __init__(self, modalities: Sequence[str], multimodal_fraction: float) -> None:
        if not 0 <= multimodal_fraction <= 1:
            raise PartitionError(f"multimodal_fraction must be in [0, 1], got {multimodal_fraction}")
        self.modalities = tuple(modalities)
        self.fraction = multimodal_fraction

    def assign(self, num_clients: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
        n_multi = int(round(self.fraction * num_clients))
        order = rng.permutation(num_clients)
        out: list[tuple[str, ...]] = [()] * num_clients
        for rank, cid in enumerate(order):
            if rank < n_multi:
                out[cid] = self.modalities
            else:
                out[cid] = (self.modalities[(rank - n_multi) % 2],)
        return out


def make_partition(cfg: Config, labels: np.ndarray, modalities: tuple[str, str], num_classes: int,
                   groups: np.ndarray | None = None) -> Partition:
    """The partition ``cfg.partition`` describes, seeded by ``cfg.seed``; ``groups``: the training samples'
    group ids, which ``scheme: natural`` needs."""
    p = cfg.partition
    rng = np.random.default_rng([cfg.seed, 104729])
    splitter: IidPartitioner | DirichletPartitioner | NaturalPartitioner
    if p.scheme == "iid":
        splitter = IidPartitioner()
    elif p.scheme == "natural":
        splitter = NaturalPartitioner(groups, p.min_samples)
    else:
        splitter = DirichletPartitioner(p.alpha, p.max_samples_per_client, p.min_samples, p.max_attempts)
    shares = splitter.split(labels, p.num_clients, rng)
    mods = ModalityAssigner(modalities, p.multimodal_fraction).assign(p.num_clients, rng)
    f = p.faults
    fault_rng = np.random.default_rng([cfg.seed, FAULT_STREAM])  # its own stream: the shares never change
    clients = tuple(
        ClientShard(i, idx, mods[i], tuple(np.bincount(labels[idx], minlength=num_classes).tolist()),
                    draw_client_faults(fault_rng, idx, mods[i], labels, num_classes, f.missing_modality,
                                       f.label_noise, f.missing_labels))
        for i, idx in enumerate(shares)
    )
    part = Partition(clients, len(labels), num_classes, modalities, {"seed": cfg.seed, **p.model_dump(mode="json")})
    part.validate(p.min_samples)
    return part


def _read_faults(raw: object, pos: int, indices: np.ndarray, modalities: tuple[str, ...], num_classes: int
                 ) -> ClientFaults:
    """A client's ``faults`` entry, checked: every sample among its own, labels among the classes, a missing
    modality only on a client holding both."""
    if raw is None:
        return ClientFaults.none()
    where = f"client #{pos}: faults"
    if not isinstance(raw, dict) or set(raw) - {"missing", "noisy_labels", "unlabeled"}:
        raise PartitionError(f"{where} must hold only missing, noisy_labels and unlabeled")
    own = set(indices.tolist())

    def samples(v: object, what: str) -> np.ndarray:
        if not isinstance(v, list) or not all(is_int(i) and i in own for i in v) or len(set(v)) != len(v):
            raise PartitionError(f"{where}: {what} must list distinct samples of the client's own")
        return np.asarray(v, dtype=np.int64)

    missing_raw = raw.get("missing", {})
    if not isinstance(missing_raw, dict) or (missing_raw and len(modalities) != 2) or \
            not set(missing_raw) <= set(modalities):
        raise PartitionError(f"{where}: missing must map the modalities of a multimodal client to samples")
    missing = {m: samples(v, f"missing.{m}") for m, v in missing_raw.items()}
    noisy_raw = raw.get("noisy_labels", [])
    if not isinstance(noisy_raw, list) or not all(
            isinstance(p, list) and len(p) == 2 and is_int(p[0]) and p[0] in own and is_int(p[1])
            and 0 <= p[1] < num_classes for p in noisy_raw):
        raise PartitionError(f"{where}: noisy_labels must be [sample, label] pairs of its own samples and classes")
    noisy = np.asarray(noisy_raw, dtype=np.int64).reshape(-1, 2)
    unlabeled = samples(raw.get("unlabeled", []), "unlabeled")
    if len(unlabeled) >= len(indices):
        raise PartitionError(f"{where}: every sample is unlabelled; a client keeps at least one label")
    return ClientFaults(missing, noisy, unlabeled)


def save_partition(part: Partition, path: str | Path) -> Path:
    return write_json(path, part.to_json())


def load_partition(path: str | Path) -> Partition:
    p = Path(path)
    if not p.is_file():
        raise PartitionError(f"partition file {p} not found; run `fedcmi partition` first")
    try:
        raw = read_json(p, expect=dict)
    except ValueError as exc:
        raise PartitionError(f"{exc}; rerun `fedcmi partition`") from None
    try:
        return Partition.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PartitionError):
            raise PartitionError(f"{p}: {exc}; rerun `fedcmi partition`") from None
        raise PartitionError(f"{p} is not a valid partition file ({exc.__class__.__name__}: {exc}); "
                             "rerun `fedcmi partition`") from None
