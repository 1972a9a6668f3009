"""A client's outcome as a file: an update, a ``skipped`` marker or a ``failed`` record.

Written by a training worker, read by the step that concludes the round. The reader trusts nothing in
the file: every metadata field is checked (kind, client id, round, sample count, modalities, metrics), so
a damaged or forged file is one :class:`UpdateRejected` with the reason, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcmi.io import ModelFileError, is_int, load_state, read_state_meta, save_state
from fedcmi.round.update import ClientFailed, ClientUpdate, UpdateRejected, pack_update, unpack_tensors

MAX_REASON = 2000


def write_update(path: Path, round_no: int, cid: int, update: ClientUpdate | None, failure: str | None = None
                 ) -> Path:
    """Client ``cid``'s outcome of round ``round_no``: its update, nothing to train (None), or a failure."""
    meta: dict[str, Any] = {"round": round_no, "client_id": cid}
    if failure is not None:
        return save_state(path, {}, {**meta, "kind": "failed", "reason": failure[:MAX_REASON]})
    if update is None:
        return save_state(path, {}, {**meta, "kind": "skipped"})
    return save_state(path, pack_update(update), {**meta, "kind": "update", "num_examples": update.num_examples,
                                           "modalities": list(update.modalities), "metrics": update.metrics})


def claimed_client(path: Path) -> int | None:
    """The client id a file claims (from its header, unverified), for naming it before it is read."""
    cid = read_state_meta(path).get("client_id")
    return cid if is_int(cid) else None


def read_update(path: str | Path, round_no: int, cid: int | None = None) -> ClientUpdate | None:
    """The outcome in ``path`` for round ``round_no`` (and client ``cid`` when the file was named for it):
    an update, None for nothing to train; :class:`ClientFailed` for a failure record."""
    path = Path(path)
    who = f"client {cid}" if cid is not None else path.name
    try:
        state, meta = load_state(path)
    except ModelFileError as exc:
        raise UpdateRejected(f"{who}: {exc}") from None
    owner = meta.get("client_id")
    if not is_int(owner):
        raise UpdateRejected(f"{who}: {path.name} names no client (client_id {owner!r})")
    if cid is not None and owner != cid:
        raise UpdateRejected(f"{who}: {path.name} carries client id {owner}")
    who = f"client {owner}"
    r = meta.get("round")
    if not is_int(r) or r != round_no:
        raise UpdateRejected(f"{who}: the file is from round {r!r}, this is round {round_no}")
    kind = meta.get("kind")
    if kind == "failed":
        raise ClientFailed(str(meta.get("reason", f"{who}: training failed"))[:MAX_REASON])
    if kind == "skipped":
        if state:
            raise UpdateRejected(f"{who}: a 'skipped' marker that holds tensors")
        return None
    if kind != "update":
        raise UpdateRejected(f"{who}: {path.name} is not a client update (kind {kind!r})")
    n: Any = meta.get("num_examples")  # checked at admission (check_update), as the engine's own updates are
    mods = meta.get("modalities")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise UpdateRejected(f"{who}: modalities must be a non-empty list of names, got {mods!r}")
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict):
        raise UpdateRejected(f"{who}: metrics must be a mapping, got {type(metrics).__name__}")
    # the client's own report of its loss and such: numbers only (a NaN loss stays: it tells of divergence)
    clean = {str(k): v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    model, extra = unpack_tensors(state)
    return ClientUpdate(owner, model, n, tuple(mods), clean, extra)
