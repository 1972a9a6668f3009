"""A client's outcome as a file: an update, a ``skipped`` marker, a ``late`` marker or a ``failed`` record.

Written by a training worker, read by the step that concludes the round. The reader trusts nothing in
the file: every metadata field is checked (kind, client id, round, sample count, modalities, metrics), so
a damaged or forged file is one :class:`UpdateRejected` with the reason, never a traceback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcmi.io import ModelFileError, is_int, load_state, read_state_meta, save_state
from fedcmi.round.update import (
    ClientFailed,
    ClientUpdate,
    Producer,
    UpdateLate,
    UpdateRejected,
    pack_update,
    unpack_tensors,
)

MAX_REASON = 2000


def write_update(path: Path, round_no: int, cid: int, update: ClientUpdate | None, failure: str | None = None,
                 late: str | None = None) -> Path:
    """Client ``cid``'s outcome of round ``round_no``: its update, nothing to train (None), a failure, or
    ``late`` (the reason it missed the round)."""
    meta: dict[str, Any] = {"round": round_no, "client_id": cid}
    if failure is not None:
        return save_state(path, {}, {**meta, "kind": "failed", "reason": failure[:MAX_REASON]})
    if late is not None:
        return save_state(path, {}, {**meta, "kind": "late", "reason": late[:MAX_REASON]})
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
    an update, None for nothing to train; :class:`ClientFailed` for a failure record, :class:`UpdateLate`
    for a late marker."""
    path = Path(path)
    who = f"client {cid}" if cid is not None else path.name
    try:
        state, meta = load_state(path, checked=True)
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
    if kind == "late":
        if state:
            raise UpdateRejected(f"{who}: a 'late' marker that holds tensors")
        raise UpdateLate(str(meta.get("reason", f"{who}: late"))[:MAX_REASON])
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


@dataclass
class _Read:
    index: int  # the file's place among the files given (only to name it)
    path: Path
    claim: int | None  # the client the file claims (None: it claims none that could be read)
    outcome: ClientUpdate | None | Exception
    digest: str | None  # of the update's tensors: what the file carries, whoever it claims to be from


def _tensor_digest(update: ClientUpdate) -> str:
    h = hashlib.sha256()
    for key in sorted(update.state):
        t = update.state[key].detach().cpu().contiguous()
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(index: int, path: Path, round_no: int) -> _Read:
    try:
        update = read_update(path, round_no)
    except (UpdateRejected, ClientFailed) as exc:
        try:
            claim = claimed_client(path)
        except ModelFileError:
            claim = None
        return _Read(index, path, claim, exc, None)
    claim = update.client_id if update is not None else claimed_client(path)
    return _Read(index, path, claim, update, _tensor_digest(update) if update is not None else None)


def _produce(outcome: ClientUpdate | None | Exception) -> Producer:
    def produce() -> ClientUpdate | None:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return produce


def settle_claims(paths: Sequence[Path], round_no: int) -> list[tuple[int, Producer]]:
    """A round's update files, given in any order, as (client, outcome) in client order: the same result
    whatever the order. Each client has one slot. A file whose update is another file's, byte for byte,
    under another client's id is a relabelled copy and is refused, so a copy cannot take the slot of the
    client it names; when several distinct files still claim one client, none of them is counted. A refused
    file that cannot keep its client's slot is reported under a negative key (-1 - its place in the list)."""
    reads = [_read(i, Path(p), round_no) for i, p in enumerate(paths)]
    owners: dict[str, set[int]] = {}
    for r in reads:
        if r.digest is not None and r.claim is not None:
            owners.setdefault(r.digest, set()).add(r.claim)
    out: list[tuple[int, Producer]] = []
    for r in (r for r in reads if r.claim is None):
        out.append((-1 - r.index, _produce(r.outcome)))
    claims: dict[int, list[_Read]] = {}
    for r in reads:
        if r.claim is not None:
            claims.setdefault(r.claim, []).append(r)
    for cid in sorted(claims):
        group = claims[cid]
        if len(group) == 1:
            out.append((cid, _produce(group[0].outcome)))
            continue
        genuine = [r for r in group if r.digest is None or owners[r.digest] == {cid}]
        for r in group:
            if r in genuine:
                continue
            others = sorted(c for c in owners[r.digest or ""] if c != cid)
            out.append((-1 - r.index, _produce(UpdateRejected(
                f"{r.path.name} claims client {cid} but carries client {others[0]}'s update, byte for byte: "
                "a relabelled copy, refused"))))
        if len(genuine) == 1:
            out.append((cid, _produce(genuine[0].outcome)))
            continue
        if genuine[0].digest is not None and {r.digest for r in genuine} == {genuine[0].digest}:
            out.append((cid, _produce(genuine[0].outcome)))  # one update given several times: counted once
            out.append((cid, _produce(UpdateRejected(
                f"client {cid} sent more than one update in round {round_no} ({len(genuine)} copies of one "
                "update); counted once"))))
            continue
        names = ", ".join(r.path.name for r in sorted(genuine, key=lambda r: r.path.name))
        reason = UpdateRejected(f"client {cid} is claimed by {len(genuine)} different files ({names}) in round "
                                f"{round_no}; none is counted")
        out.append((cid, _produce(reason)))
    return sorted(out, key=lambda t: t[0])
