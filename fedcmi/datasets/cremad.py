"""CREMA-D (Cao et al., "CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset", IEEE TAC 2014).

Audio-visual emotion recognition, 6 classes from the clip names
(``1001_IEO_NEU_XX``: actor, sentence, emotion, level). Layout, under ``data.path``::

    AudioWAV/<clip>.wav               the audio (16 kHz mono PCM as distributed)
    Image-01-FPS/<clip>/<n>.jpg       frames extracted at 1 fps (data.cremad.frames_dir), or else
    VideoFlash/<clip>.flv             the videos, decoded with PyAV (pip install 'fedcmi[video]')
    train.csv, test.csv               the common split lists, rows ``clip,EMOTION`` (split: lists)
    processedResults/summaryTable.csv the raters' votes (labels: vote4)

Two class sets: ``labels: clip``, the 6 emotions of the clip names (FedCMI's protocol), or ``labels:
vote4``, the audio-visual raters' vote (``MultiModalVote``) where it is one of anger, sadness, happiness or
neutral (FedMultimodal's four classes; clips voted otherwise, or tied, are left out and counted).

With ``split: speakers`` no lists are needed: actors are split by a seeded draw; ``split: speaker_folds``
holds out fold ``fold`` of ``folds`` contiguous folds of the actors in id order (FedMultimodal's split).
Every sample keeps its actor as its group id, so ``partition.scheme: natural`` can make each actor a client.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fedcmi.config import Config, Float, Int
from fedcmi.data.base import DataError, DatasetSpec
from fedcmi.data.cache import AudioVisualOptions, Record, RecordSource, Skipped, audio_visual_spec
from fedcmi.data.media import MediaError, audio_features, load_frames, read_wav, sorted_images, video_frames
from fedcmi.datasets.base import Dataset


class CremaDOptions(AudioVisualOptions):
    """CREMA-D: 6 emotions from the clip names or 4 from the raters' votes; the common split lists, a seeded
    split by speaker, or speaker folds."""

    labels: Literal["clip", "vote4"] = Field(
        "clip", description="clip: the 6 emotions of the clip names; vote4: the raters' audio-visual vote, where it "
        "is anger, sadness, happiness or neutral (FedMultimodal's classes)")
    split: Literal["lists", "speakers", "speaker_folds"] = "lists"
    train_list: str = "train.csv"
    test_list: str = "test.csv"
    summary_table: str = Field("processedResults/summaryTable.csv", description="the raters' votes (labels: vote4)")
    test_speakers: Float = Field(0.1, gt=0, lt=1, description="fraction of actors held out (split: speakers)")
    folds: Int = Field(5, ge=2, le=91, description="contiguous folds of the actors in id order (split: speaker_folds)")
    fold: Int = Field(1, ge=1, description="the fold held out as the test split (split: speaker_folds)")
    val_fraction: Float = Field(0.0, ge=0, lt=0.5, description="of the training actors, held out as validation")

    @model_validator(mode="after")
    def _fold_exists(self) -> CremaDOptions:
        if self.fold > self.folds:
            raise ValueError(f"fold {self.fold} of {self.folds} folds does not exist (folds are 1..{self.folds})")
        return self


EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
#: labels: vote4: the vote's letter -> the class, in FedMultimodal's order
VOTES = {"A": "ANG", "S": "SAD", "H": "HAP", "N": "NEU"}


def clip_emotion(clip: str) -> str:
    parts = clip.split("_")
    return parts[2].upper() if len(parts) >= 3 else ""


def clip_actor(clip: str) -> str:
    return clip.split("_")[0]


class CremaDSource(RecordSource):
    def __init__(self, root: Path, cfg: CremaDOptions, seed: int) -> None:
        self.root, self.cfg, self.seed = Path(root), cfg, seed
        self.excluded = 0  # clips outside the class set (labels: vote4), counted by records()
        c = cfg
        self.layout = (f"  {self.root}/{c.audio_dir}/<clip>.wav\n"
                       f"  {self.root}/{c.frames_dir}/<clip>/<n>.jpg  (or {self.root}/{c.video_dir}/<clip>.flv)\n"
                       + (f"  {self.root}/{c.train_list} and {self.root}/{c.test_list}, rows 'clip,EMOTION'"
                          if c.split == "lists" else ""))

    # -- which clips, in which split ------------------------------------------------------------------
    def _read_list(self, name: str) -> list[tuple[str, str]]:
        path = self.require(self.root / name, "the CREMA-D split list")
        rows: list[tuple[str, str]] = []
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip():
                    continue
                clip = Path(row[0].strip()).stem
                label = row[1].strip().upper() if len(row) > 1 else clip_emotion(clip)
                if not rows and clip.lower() in ("clip", "name", "file", "path"):  # a header row
                    continue
                rows.append((clip, label))
        return rows

    def _votes(self) -> dict[str, str]:
        """clip -> the raters' audio-visual vote (``MultiModalVote``) from the summary table."""
        path = self.require(self.root / self.cfg.summary_table, "the CREMA-D raters' summary table (labels: vote4)")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"FileName", "MultiModalVote"} <= set(reader.fieldnames):
                raise DataError(f"{path} lacks the columns FileName and MultiModalVote (it has "
                                f"{reader.fieldnames}); is it processedResults/summaryTable.csv?")
            return {row["FileName"].strip(): (row["MultiModalVote"] or "").strip().upper() for row in reader}

    def _speaker_fold(self, clips: list[str]) -> tuple[list[str], list[str]]:
        """(train, test): the actors in id order cut into ``folds`` contiguous folds, the first ones one actor
        larger where they do not divide evenly; fold ``fold`` is the test split."""
        actors = sorted({clip_actor(c) for c in clips})
        if len(actors) < self.cfg.folds:
            raise DataError(f"data.cremad.folds={self.cfg.folds} exceeds the {len(actors)} actors found")
        held = set(np.array_split(np.array(actors), self.cfg.folds)[self.cfg.fold - 1].tolist())
        return [c for c in clips if clip_actor(c) not in held], [c for c in clips if clip_actor(c) in held]

    def _hold_out_actors(self, clips: list[str], fraction: float, stream: int) -> tuple[list[str], list[str]]:
        """(kept, held out): a seeded ``fraction`` of the clips' actors held out whole; list order kept."""
        actors = sorted({clip_actor(c) for c in clips})
        rng = np.random.default_rng([self.seed, 314159, stream])
        n = max(1, round(fraction * len(actors))) if fraction > 0 else 0
        held = {actors[i] for i in rng.permutation(len(actors))[:n]}
        return [c for c in clips if clip_actor(c) not in held], [c for c in clips if clip_actor(c) in held]

    def records(self) -> tuple[dict[str, list[Record]], list[Skipped]]:
        self.require(self.root, "the CREMA-D root folder")
        audio_dir = self.require(self.root / self.cfg.audio_dir, "the CREMA-D audio folder")
        if self.cfg.split == "lists":
            listed = {"train": self._read_list(self.cfg.train_list), "test": self._read_list(self.cfg.test_list)}
            labels = {c: lab for rows in listed.values() for c, lab in rows}
            splits = {"train": [c for c, _ in listed["train"]], "test": [c for c, _ in listed["test"]]}
        else:
            clips = sorted(p.stem for p in audio_dir.glob("*.wav"))
            if not clips:
                raise DataError(f"no .wav files in {audio_dir}; expected layout:\n{self.layout}")
            labels = {c: clip_emotion(c) for c in clips}
            if self.cfg.split == "speaker_folds":
                train, test = self._speaker_fold(clips)
            else:
                train, test = self._hold_out_actors(clips, self.cfg.test_speakers, 1)
            if not test or not train:
                raise DataError(f"data.cremad.test_speakers={self.cfg.test_speakers} leaves an empty split "
                                f"among {len({clip_actor(c) for c in clips})} actors")
            splits = {"train": train, "test": test}
        self.excluded = 0
        if self.cfg.labels == "vote4":
            # the class set leaves clips out by design: counted, never taken for unreadable samples
            votes = self._votes()
            labels = {c: VOTES.get(votes.get(c, ""), "") for c in labels}
            for name, clips in splits.items():
                kept = [c for c in clips if labels[c]]
                self.excluded += len(clips) - len(kept)
                splits[name] = kept
        if self.cfg.val_fraction > 0:  # validation actors come out of the training split, never the test split
            splits["train"], splits["val"] = self._hold_out_actors(splits["train"], self.cfg.val_fraction, 2)
        out: dict[str, list[Record]] = {}
        skipped: list[Skipped] = []
        actors = sorted({clip_actor(c) for clips in splits.values() for c in clips})
        # the actor is the sample's group (partition.scheme: natural makes actors the clients): its number
        # as distributed (1001..1091), or its rank where an id is not a number
        numeric = all(a.isdigit() for a in actors)
        group = {a: int(a) if numeric else i for i, a in enumerate(actors)}
        for split, clips in splits.items():
            if split == "val" and not clips:
                continue
            recs = []
            classes = self.classes()
            for clip in clips:
                label = labels[clip]
                if label not in classes:
                    skipped.append(Skipped(split, clip, f"unknown label {label!r} (known: {list(classes)})"))
                    continue
                recs.append(Record(split, clip, classes.index(label), group=group[clip_actor(clip)]))
            out[split] = recs
        return out, skipped

    # -- one clip -----------------------------------------------------------------------------------------
    def decode(self, record: Record) -> dict[str, np.ndarray]:
        c, clip = self.cfg, record.key
        wav = self.root / c.audio_dir / f"{clip}.wav"
        if not wav.is_file():
            raise MediaError(f"{wav}: missing")
        x, rate = read_wav(wav)
        audio = audio_features(x, rate, c.sample_rate, c.audio_seconds, c.nperseg, c.noverlap)
        frames = sorted_images(self.root / c.frames_dir / clip)
        video = self.root / c.video_dir / f"{clip}.flv"
        if frames:
            visual = load_frames(frames, c.frames, c.frame_size)
        elif video.is_file():
            visual = video_frames(video, c.frames, c.frame_size, c.fps)
        else:
            raise MediaError(f"no frames in {self.root / c.frames_dir / clip} and no video {video}")
        return {"audio": audio, "visual": visual}

    def classes(self) -> tuple[str, ...]:
        return tuple(VOTES.values()) if self.cfg.labels == "vote4" else EMOTIONS

    def spec(self) -> DatasetSpec:
        return audio_visual_spec(self.cfg, self.classes())

    def info(self) -> dict:
        out: dict[str, Any] = {"root": str(self.root), "cremad": self.cfg.model_dump(mode="json")}
        if self.cfg.labels == "vote4":
            out["excluded_by_class_set"] = self.excluded
        return out


class CremaD(Dataset):
    """CREMA-D: audio + video of actors speaking with one of 6 emotions (``data.cremad``)."""

    name = "cremad"
    Options = CremaDOptions
    modalities = ("audio", "visual")

    @classmethod
    def source(cls, cfg: Config) -> CremaDSource:
        return CremaDSource(cfg.data.path, cfg.data.options(CremaDOptions), cfg.seed)

    @classmethod
    def split_card(cls, cfg: Config) -> str:
        c = cfg.data.options(CremaDOptions)
        split = {"lists": f"lists {c.train_list}/{c.test_list}",
                 "speakers": f"speakers, {c.test_speakers:g} of the actors held out (seed {cfg.seed})",
                 "speaker_folds": f"speaker fold {c.fold} of {c.folds}"}[c.split]
        return split + (f", val {c.val_fraction:g} of the training actors" if c.val_fraction else "")
