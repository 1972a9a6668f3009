"""Atomic file writes and safe model-state files.

Every file fedcmi writes goes to a temporary sibling first, is fsynced and then
renamed over the target, so a crash leaves either the old file or the new one,
never half of one. It replaces only a file it could have written: one of the same
kind, recognised by content (see :func:`file_kind`), so a path mistyped into a
setting or a flag (``partition.file=params.yaml``) is refused, never overwritten.
Model states are safetensors with a content checksum checked on every load;
legacy torch files are read only with ``weights_only=True``.
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

from fedcmi.errors import EXIT_USAGE, FedcmiError

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


class ForeignFile(FedcmiError, ValueError):
    """A write that would replace a file fedcmi did not write (another kind of file, or a folder)."""

    exit_code = EXIT_USAGE
    retry_helps = False


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SNIFF_LIMIT = 256 * 1024 * 1024  # a JSON file larger than this is no file fedcmi writes


def _json_shape(value: Any) -> tuple[str, frozenset[str]]:
    """A JSON value's kind and the keys that identify it (an object's, or a list's first object's)."""
    if isinstance(value, dict):
        return "json-object", frozenset(value)
    if isinstance(value, list):
        first = next((v for v in value if isinstance(v, dict)), None)
        return "json-list", frozenset(first) if first is not None else frozenset()
    return "json-value", frozenset()


def file_kind(head: bytes, read: Callable[[int | None], bytes]) -> tuple[str, frozenset[str]]:
    """What kind of file these bytes begin: a PNG, a fedcmi model state or another safetensors file, a JSON
    object or list (with its identifying keys), an HTML page, or ``other``."""
    if head.startswith(PNG_MAGIC):
        return "png", frozenset()
    if len(head) >= 10 and head[8:10] == b'{"':
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= MAX_HEADER:
            try:
                header = json.loads(read(8 + n)[8:])  # the header alone, never the tensors
                fmt = str(header.get("__metadata__", {}).get("format", ""))
                return ("fedcmi-state" if fmt.startswith("fedcmi-state") else "safetensors"), frozenset()
            except (ValueError, AttributeError):
                pass
    text = head.lstrip()[:15].lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "html", frozenset()
    if text[:1] in (b"{", b"["):
        try:
            return _json_shape(json.loads(read(None)))
        except (ValueError, RecursionError):
            return "other", frozenset()
    return "other", frozenset()


def _same_kind(old: tuple[str, frozenset[str]], new: tuple[str, frozenset[str]]) -> bool:
    if old[0] != new[0]:
        return False
    # JSON: one of fedcmi's records shares its keys with the record replacing it (an empty one has none)
    return not (old[1] and new[1]) or bool(old[1] & new[1])


def _kind_of_file(path: Path) -> tuple[str, frozenset[str]]:
    with open(path, "rb") as fh:
        head = fh.read(64)
    big = path.stat().st_size > _SNIFF_LIMIT

    def read(n: int | None) -> bytes:
        if n is None:
            return b"" if big else path.read_bytes()
        with open(path, "rb") as fh:
            return fh.read(n)
    return file_kind(head, read)


def check_replaceable(target: str | Path, new: bytes | Path) -> None:
    """Raise :class:`ForeignFile` when ``target`` exists and is not the kind of file ``new`` (bytes, or a
    written file) is: nothing fedcmi writes may replace a file it did not write. An empty file is nothing
    to lose and may be replaced."""
    target = Path(target)
    if target.is_dir():
        raise ForeignFile(f"cannot write {target}: it is a folder; name a file")
    if not target.exists() or target.stat().st_size == 0:
        return
    old = _kind_of_file(target)
    if isinstance(new, Path):
        fresh = _kind_of_file(new)
    else:
        data = new
        fresh = file_kind(data[:64], lambda n: data if n is None else data[:n])
    if not _same_kind(old, fresh):
        what = {"other": "a file of another kind", "json-value": "another JSON file"}.get(old[0], old[0])
        if old[0].startswith("json") and old[0] == fresh[0]:
            what = f"a JSON file with other keys ({', '.join(sorted(old[1])[:4])})"
        raise ForeignFile(f"refusing to overwrite {target}: it is {what}, not a file fedcmi wrote there; "
                          "name another path, or move that file away first (nothing was written)")


@contextlib.contextmanager
def atomic_path(target: str | Path, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success.

    On any failure (a full disk, a killed writer) the temporary file goes and
    ``target`` keeps its old content. The new file replaces only a file of its own kind
    (:func:`check_replaceable`), unless ``owned``: a file in a folder fedcmi made and holds the lock of
    (a checkpoint folder), which it may replace even when damaged.
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
        if not owned:
            check_replaceable(target, tmp_path)
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


def write_bytes(target: str | Path, data: bytes, owned: bool = False) -> Path:
    if not owned:
        check_replaceable(target, data)  # before a temporary is made: a refused write leaves no trace
    with atomic_path(target, owned=True) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str, owned: bool = False) -> Path:
    return write_bytes(target, text.encode(), owned)


def write_json(target: str | Path, obj: Any, sort_keys: bool = True, owned: bool = False) -> Path:
    """``obj`` as indented JSON, atomically; keys sorted unless the caller's order is the point."""
    return write_text(target, json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=True) + "\n", owned)


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


def save_state(target: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
               owned: bool = False) -> Path:
    """Save a state dict as safetensors with JSON metadata and a content checksum, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta_json = json.dumps(dict(meta or {}), sort_keys=True)
    header, data = _split(save_bytes(tensors, metadata={"format": FORMAT, "meta": meta_json}), "a new state")
    header["__metadata__"]["sha256"] = _digest(header, data)
    # Serialised here and written by write_bytes, so a full disk is an OSError like every other write failure.
    return write_bytes(target, _assemble(header, data), owned)


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


def load_state(path: str | Path, checked: bool = False) -> tuple[StateDict, dict[str, Any]]:
    """Load a state written by :func:`save_state` (or, unless ``checked``, a plain safetensors or a
    weights-only torch file: a user's own model).

    A file of this format must match its checksum: a changed byte anywhere (a dtype or shape in the
    header, the metadata, the data) is a :class:`ModelFileError`, never a model that loads with other
    numbers. A file declaring the first format (``fedcmi-state/1``, before the checksum) is refused: every
    file fedcmi has written since carries ``fedcmi-state/2``, so such a file is from a pre-checksum version
    or re-labelled to skip the check. ``checked``: where fedcmi reads back its own files (checkpoints,
    updates, the store, a registered model's weights), only a checksummed file is taken.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {p} not found")
    if checked and p.suffix in (".pt", ".pth"):
        raise ModelFileError(f"{p} refused: a torch file carries no checksum, and here fedcmi reads only its "
                             f"own checksummed files ({FORMAT})")
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
    if fmt in OLD_FORMATS:
        raise ModelFileError(f"{p} refused: it declares {fmt}, the format before checksums, so it cannot be "
                             f"verified (fedcmi writes {FORMAT}); retrain or re-save it with this fedcmi")
    if checked and fmt != FORMAT:
        raise ModelFileError(f"{p} refused: it is not a checksummed fedcmi file ({FORMAT}), and here fedcmi "
                             "reads only its own files")
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
