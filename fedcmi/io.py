"""Atomic file writes and safe model-state files.

Every file fedcmi writes goes to a temporary sibling first, is fsynced and then
renamed over the target, so a crash leaves either the old file or the new one,
never half of one. Model states are safetensors with a content checksum
checked on every load; legacy torch files are read only with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedcmi.errors import FedcmiError

StateDict = dict[str, torch.Tensor]
FORMAT = "fedcmi-state/2"  # /2: a content checksum in the metadata
OLD_FORMATS = ("fedcmi-state/1",)
MAX_HEADER = 100_000_000  # safetensors' own limit on a header
TMP_SUFFIX = ".tmp"


def is_int(value: Any) -> TypeGuard[int]:
    """An integer read from a file: never a bool, and never a float that happens to be whole."""
    return isinstance(value, int) and not isinstance(value, bool)


class ModelFileError(FedcmiError, ValueError):
    """A model file that is missing, corrupt, or not in a safe format."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _cannot_write(target: Path, exc: OSError) -> OSError:
    """The same OSError (errno kept), saying which file could not be written and that nothing was replaced."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot write {target}: {reason}; the previous file, if any, is untouched") \
        if exc.errno is not None else OSError(f"cannot write {target}: {reason}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success.

    On any failure (a full disk, a killed writer) the temporary file goes and
    ``target`` keeps its old content.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create output folder {target.parent}: {exc.strerror}") from None
    tmp_path = target.parent / f".{target.name}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        # 0666 through the umask, as an ordinary write would (mkstemp's 0600 would hide every output from
        # the group: a shared volume, a pod running as another user, DVC's cache)
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its mode
            os.chmod(tmp_path, target.stat().st_mode & 0o7777)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not str(exc).startswith("cannot write"):
            raise _cannot_write(target, exc) from None
        raise


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; a clear OSError if not."""
    folder = Path(folder)
    probe = folder / ".fedcmi-write-probe"
    write_bytes(probe, b"ok")
    probe.unlink()
    return folder


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (never a committed file)."""
    stale = sorted(Path(folder).glob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for f in stale:
        with contextlib.suppress(OSError):
            f.unlink()
    return stale


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode())


def write_json(target: str | Path, obj: Any, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON, atomically; keys sorted unless the caller's order is the point."""
    return write_text(target, json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=True) + "\n")


class JsonFileError(FedcmiError, ValueError):
    """A JSON file that is damaged, nested past reason, or not the kind of value expected."""


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """A JSON file's value (of type ``expect`` when given); :class:`JsonFileError` naming the file if not."""
    p = Path(path)
    try:
        value = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JsonFileError(f"{p} is not valid JSON: {exc}") from None
    except RecursionError:
        raise JsonFileError(f"{p} is nested too deeply to be one of fedcmi's files") from None
    if expect is not None and not isinstance(value, expect):
        raise JsonFileError(f"{p} holds a JSON {type(value).__name__}, expected a JSON "
                            f"{'object' if expect is dict else expect.__name__}")
    return value


def write_with(target: str | Path, writer: Callable[[Path], None]) -> Path:
    """Atomically write ``target`` with ``writer(tmp_path)``."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def save_state(target: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Save a state dict as safetensors with JSON metadata and a content checksum, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta_json = json.dumps(dict(meta or {}), sort_keys=True)
    header, data = _split(save_bytes(tensors, metadata={"format": FORMAT, "meta": meta_json}), "a new state")
    header["__metadata__"]["sha256"] = _digest(header, data)
    # Serialised here and written by write_bytes, so a full disk is an OSError like every other write failure.
    return write_bytes(target, _assemble(header, data))


def _split(raw: bytes, where: object) -> tuple[dict[str, Any], memoryview]:
    """A safetensors file's JSON header and its data section; ModelFileError when the frame is damaged."""
    if len(raw) < 8:
        raise ModelFileError(f"{where} is not a safetensors file (only {len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n > min(len(raw) - 8, MAX_HEADER):
        raise ModelFileError(f"{where} is damaged: its header claims {n} bytes and the file holds {len(raw) - 8}")
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{where} is damaged: its header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ModelFileError(f"{where} is damaged: its header is not a safetensors header")
    header.setdefault("__metadata__", {})
    return header, memoryview(raw)[8 + n:]


def _digest(header: Mapping[str, Any], data: memoryview | bytes) -> str:
    """SHA-256 over what a file means: every tensor's dtype, shape and offsets, the metadata but the
    checksum itself, and the data bytes. Another key order gives the same digest."""
    described = {k: v for k, v in header.items() if k != "__metadata__"}
    metadata = {k: v for k, v in header["__metadata__"].items() if k != "sha256"}
    h = hashlib.sha256(json.dumps([described, metadata], sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def _assemble(header: Mapping[str, Any], data: memoryview | bytes) -> bytes:
    """A safetensors file from a header and its data: keys sorted (safetensors writes its metadata map in
    an order that changes between processes, so the same state would give other bytes and DVC a changed
    output), padded with spaces to 8 bytes as safetensors aligns it."""
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + bytes(data)


def read_state_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` of a state file, from its header alone (no checksum check: for listing, not for use)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= MAX_HEADER:
                return {}
            header = json.loads(fh.read(n))
        meta = json.loads(header["__metadata__"]["meta"])
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_state(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """Load a state written by :func:`save_state` (or a torch file, weights only).

    A file of this format must match its checksum: a changed byte anywhere (a dtype or shape in the
    header, the metadata, the data) is a :class:`ModelFileError`, never a model that loads with other
    numbers. Files of the first format (``fedcmi-state/1``, no checksum) and plain safetensors files
    load without one.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {p} not found")
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler refuses anything but tensors and plain containers
            raise ModelFileError(f"{p} refused: not a weights-only torch file ({exc.__class__.__name__})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelFileError(f"{p} does not hold a flat state dict of tensors")
        return dict(obj), {}
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{p} cannot be read ({exc.strerror or exc})") from None
    header, data = _split(raw, p)
    metadata = header["__metadata__"]
    fmt = metadata.get("format")
    if fmt == FORMAT or "sha256" in metadata:
        if metadata.get("sha256") != _digest(header, data):
            raise ModelFileError(f"{p} is damaged: its content does not match its checksum")
    try:
        state = load_bytes(raw)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{p} is not a readable safetensors file ({exc})") from None
    if fmt not in (FORMAT, *OLD_FORMATS):
        return state, {}
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except (ValueError, RecursionError):
        raise ModelFileError(f"{p} is damaged: its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{p} is damaged: its metadata is not a JSON object")
    return state, meta
