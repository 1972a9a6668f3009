"""Tweets to token ids or to pretrained word-vector averages, with nothing downloaded.

``clean`` strips URLs, user handles and the retweet marker (as the field does
for CrisisMMD); :class:`Vocabulary` is built from the training split only,
deterministically (by count, then alphabetically); ``WordVectors`` reads a
local vectors file in the plain text format GloVe, word2vec and fastText
share (``word v1 v2 ...`` per line; fastText's ``count dim`` header line is
skipped).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedcmi.errors import FedcmiError

PAD, UNK = 0, 1
_URL = re.compile(r"https?://\S+|www\.\S+")
_HANDLE = re.compile(r"@\w+")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|#[a-z0-9_]+")


class TextError(FedcmiError, ValueError):
    """A vocabulary or vectors file that cannot be used."""


def clean(text: str) -> str:
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = re.sub(r"^\s*rt\b", " ", text, flags=re.IGNORECASE)
    return text.lower()


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(clean(text))


class Vocabulary:
    """Token -> id, with 0 for padding and 1 for unknown tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = ["<pad>", "<unk>", *tokens]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int, max_size: int) -> Vocabulary:
        counts = Counter(t for text in texts for t in tokenize(text))
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls(kept[: max(max_size - 2, 0)])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_tokens: int) -> np.ndarray:
        ids = [self.index.get(t, UNK) for t in tokenize(text)][:max_tokens]
        out = np.full(max_tokens, PAD, dtype=np.int64)
        out[: len(ids)] = ids
        return out


class WordVectors:
    """Pretrained word vectors from a local text file, restricted to the words that are asked for."""

    def __init__(self, path: Path, wanted: set[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise TextError(f"data.crisismmd.text_model: no word-vectors file at {path}")
        self.vectors: dict[str, np.ndarray] = {}
        dim = None
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh):
                parts = line.rstrip("\n").rstrip().split(" ")
                if n == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # fastText / word2vec header: count and dimension
                if len(parts) < 2:
                    continue
                word, values = parts[0], parts[1:]
                if dim is None:
                    dim = len(values)
                if len(values) != dim:
                    raise TextError(f"{path}, line {n + 1}: {len(values)} values where earlier lines have {dim}")
                if wanted is None or word in wanted:
                    try:
                        self.vectors[word] = np.asarray(values, dtype=np.float32)
                    except ValueError:
                        raise TextError(f"{path}, line {n + 1}: not a number in the vector of {word!r}") from None
        if dim is None:
            raise TextError(f"{path} holds no word vectors")
        self.dim = dim

    def embed(self, text: str) -> np.ndarray:
        """The mean vector of the text's known words (zeros when none is known)."""
        found = [self.vectors[t] for t in tokenize(text) if t in self.vectors]
        return np.mean(found, axis=0).astype(np.float32) if found else np.zeros(self.dim, np.float32)
