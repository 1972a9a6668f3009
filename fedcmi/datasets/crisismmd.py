"""CrisisMMD v2.0 (Alam et al., "CrisisMMD: Multimodal Twitter Datasets from Natural Disasters", ICWSM 2018).

Tweets with their image; the informative task (2 classes) or the humanitarian
task (8 classes, or 6 with ``merge_humanitarian``). Layout, under ``data.path``
(the ``CrisisMMD_v2.0`` folder)::

    crisismmd_datasplit_all/task_<task>_text_img_{train,dev,test}.tsv    (data.crisismmd.split_dir)
        columns event_name, tweet_id, image_id, tweet_text, image, label, label_text, label_image, label_text_image
    data_image/<event>/<date>/<image_id>.jpg                               the ``image`` column, relative to data.path

Each row's own text and image form one sample (the dev split is the
validation split). Text becomes token ids over a vocabulary built from the
training split (``text: vocab``, for the trainable ``text`` encoder) or the mean
of local pretrained word vectors (``text: vectors``, for the ``mlp`` encoder).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedcmi.config import Config, Int, Section
from fedcmi.data.base import DataError, DatasetSpec
from fedcmi.data.cache import IMAGENET_NORM, Record, RecordSource, Skipped
from fedcmi.data.media import MediaError, load_image
from fedcmi.data.text import Vocabulary, WordVectors, tokenize
from fedcmi.datasets.base import Dataset

CLASSES = {
    "informative": ("informative", "not_informative"),
    "humanitarian": ("affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
                     "missing_or_found_people", "not_humanitarian", "other_relevant_information",
                     "rescue_volunteering_or_donation_effort", "vehicle_damage"),
}
MERGED = {"injured_or_dead_people": "affected_individuals", "missing_or_found_people": "affected_individuals"}
SPLIT_FILES = {"train": "train", "val": "dev", "test": "test"}
COLUMNS = ("tweet_text", "image")


class CrisisMMDOptions(Section):
    """CrisisMMD v2.0: tweet image + text, the informative (2) or humanitarian (8) task."""

    task: Literal["informative", "humanitarian"] = "informative"
    split_dir: str = "crisismmd_datasplit_all"
    label_column: Literal["label", "label_text", "label_image", "label_text_image"] = "label"
    merge_humanitarian: bool = Field(False, description="fold injured/dead and missing/found into "
                                     "affected_individuals: 6 classes instead of 8")
    image_size: Int = Field(224, ge=8, le=1024)
    text: Literal["vocab", "vectors"] = Field(
        "vocab", description="vocab: token ids over a vocabulary from the training split, for the trainable "
        "'text' encoder; vectors: the mean of pretrained word vectors (text_model), for the 'mlp' encoder")
    max_tokens: Int = Field(48, ge=1, le=1024)
    min_token_count: Int = Field(2, ge=1, description="training-split count a token needs to enter the vocabulary")
    max_vocab: Int = Field(20000, ge=10)
    text_model: Path | None = Field(None, description="word vectors stored locally, one 'word v1 v2 ...' per line "
                                       "(GloVe, word2vec or fastText text format), for text: vectors")


class CrisisMMDSource(RecordSource):
    def __init__(self, root: Path, cfg: CrisisMMDOptions) -> None:
        self.root, self.cfg = Path(root), cfg
        self.layout = (f"  {self.root}/{cfg.split_dir}/task_{cfg.task}_text_img_{{train,dev,test}}.tsv "
                       f"(columns including {', '.join(COLUMNS)}, {cfg.label_column})\n"
                       f"  {self.root}/data_image/<event>/<date>/<id>.jpg (the tsv's 'image' column)")
        names = CLASSES[cfg.task]
        if cfg.task == "humanitarian" and cfg.merge_humanitarian:
            names = tuple(n for n in names if n not in MERGED)
        self.classes: tuple[str, ...] = names
        self.vocab: Vocabulary | None = None
        self.vectors: WordVectors | None = None

    def _class_of(self, label: str) -> int | None:
        label = label.strip()
        if self.cfg.task == "humanitarian" and self.cfg.merge_humanitarian:
            label = MERGED.get(label, label)
        return self.classes.index(label) if label in self.classes else None

    def _read(self, split: str) -> list[dict]:
        name = f"task_{self.cfg.task}_text_img_{SPLIT_FILES[split]}.tsv"
        path = self.require(self.root / self.cfg.split_dir / name, "the CrisisMMD split file")
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [c for c in (*COLUMNS, self.cfg.label_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks column(s) {missing}; it has {reader.fieldnames}")
            return list(reader)

    def records(self) -> tuple[dict[str, list[Record]], list[Skipped]]:
        self.require(self.root, "the CrisisMMD root folder")
        rows = {split: self._read(split) for split in SPLIT_FILES}
        out: dict[str, list[Record]] = {}
        skipped: list[Skipped] = []
        for split, split_rows in rows.items():
            recs = []
            for n, row in enumerate(split_rows, 2):  # line 1 is the header
                key = f"{row.get('image_id') or row.get('tweet_id') or 'row'}@{split}:{n}"
                cls = self._class_of(row[self.cfg.label_column] or "")
                if cls is None:
                    skipped.append(Skipped(split, key, f"unknown label {row[self.cfg.label_column]!r} "
                                                       f"(known: {list(self.classes)})"))
                    continue
                recs.append(Record(split, key, cls, {"image": row["image"], "text": row["tweet_text"] or ""}))
            out[split] = recs
        c = self.cfg
        if c.text == "vocab":
            self.vocab = Vocabulary.build((r.fields["text"] for r in out["train"]), c.min_token_count, c.max_vocab)
        else:
            if c.text_model is None:
                raise DataError("data.crisismmd.text is 'vectors' but data.crisismmd.text_model names no file")
            words = {t for recs in out.values() for r in recs for t in tokenize(r.fields["text"])}
            self.vectors = WordVectors(c.text_model, words)
        return out, skipped

    def decode(self, record: Record) -> dict[str, np.ndarray]:
        path = self.root / record.fields["image"]
        if not path.is_file():
            raise MediaError(f"{path}: missing")
        image = load_image(path, self.cfg.image_size)
        text = (self.vocab.encode(record.fields["text"], self.cfg.max_tokens) if self.vocab is not None
                else self.vectors.embed(record.fields["text"]))  # type: ignore[union-attr]
        return {"image": image, "text": text}

    def spec(self) -> DatasetSpec:
        s = self.cfg.image_size
        if self.vocab is not None:
            text_shape, dtypes = (self.cfg.max_tokens,), {"image": "uint8", "text": "int64"}
            vocab = {"text": len(self.vocab)}
        else:
            assert self.vectors is not None, "call records() first"
            text_shape, dtypes, vocab = (self.vectors.dim,), {"image": "uint8"}, {}
        return DatasetSpec(("image", "text"), {"image": (3, s, s), "text": text_shape}, len(self.classes),
                           self.classes, dtypes=dtypes, normalize={"image": IMAGENET_NORM}, vocab_sizes=vocab)

    def info(self) -> dict:
        out: dict[str, Any] = {"root": str(self.root), "crisismmd": self.cfg.model_dump(mode="json")}
        if self.vocab is not None:
            out["vocabulary_size"] = len(self.vocab)
        return out

    def extra_files(self) -> dict:
        """The vocabulary travels with the cache: new tweets must be encoded with the same ids."""
        return {"vocabulary_text.json": self.vocab.tokens} if self.vocab is not None else {}


class CrisisMMD(Dataset):
    """CrisisMMD v2.0: tweet image + text, the informative or humanitarian task (``data.crisismmd``)."""

    name = "crisismmd"
    Options = CrisisMMDOptions
    modalities = ("image", "text")

    @classmethod
    def source(cls, cfg: Config) -> CrisisMMDSource:
        return CrisisMMDSource(cfg.data.path, cfg.data.options(CrisisMMDOptions))
