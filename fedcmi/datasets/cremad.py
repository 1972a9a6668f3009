"""CREMA-D (Cao et al., "CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset", IEEE TAC 2014).

Audio-visual emotion recognition, 6 classes from the clip names
(``1001_IEO_NEU_XX``: actor, sentence, emotion, level). Layout, under ``data.path``::

    AudioWAV/<clip>.wav               the audio (16 kHz mono PCM as distributed)
    Image-01-FPS/<clip>/<n>.jpg       frames extracted at 1 fps (data.cremad.frames_dir), or else
    VideoFlash/<clip>.flv             the videos, decoded with PyAV (pip install 'fedcmi[video]')
    train.csv, test.csv               the common split lists, rows ``clip,EMOTION`` (split: lists)

With ``split: speakers`` no lists are needed: actors are split by a seeded draw. Every sample keeps its
actor as its group id, so ``partition.scheme: natural`` can make each actor a client.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from fedcmi.config import Config, Float
from fedcmi.data.base import DataError, DatasetSpec
from fedcmi.data.cache import AudioVisualOptions, Record, RecordSource, Skipped, audio_visual_spec
from fedcmi.data.media import MediaError, audio_features, load_frames, read_wav, sorted_images, video_frames
from fedcmi.datasets.base import Dataset


class CremaDOptions(AudioVisualOptions):
    """CREMA-D: 6 emotions from the clip names; the common split lists or a seeded split by speaker."""

    split: Literal["lists", "speakers"] = "lists"
    train_list: str = "train.csv"
    test_list: str = "test.csv"
    test_speakers: Float = Field(0.1, gt=0, lt=1, description="fraction of actors held out (split: speakers)")
    val_fraction: Float = Field(0.0, ge=0, lt=0.5, description="of the training actors, held out as validation")


EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def clip_emotion(clip: str) -> str:
    parts = clip.split("_")
    return parts[2].upper() if len(parts) >= 3 else ""


def clip_actor(clip: str) -> str:
    return clip.split("_")[0]


class CremaDSource(RecordSource):
    def __init__(self, root: Path, cfg: CremaDOptions, seed: int) -> None:
        self.root, self.cfg, self.seed = Path(root), cfg, seed
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
            train, test = self._hold_out_actors(clips, self.cfg.test_speakers, 1)
            if not test or not train:
                raise DataError(f"data.cremad.test_speakers={self.cfg.test_speakers} leaves an empty split "
                                f"among {len({clip_actor(c) for c in clips})} actors")
            splits = {"train": train, "test": test}
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
            for clip in clips:
                label = labels[clip]
                if label not in EMOTIONS:
                    skipped.append(Skipped(split, clip, f"unknown label {label!r} (known: {list(EMOTIONS)})"))
                    continue
                recs.append(Record(split, clip, EMOTIONS.index(label), group=group[clip_actor(clip)]))
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

    def spec(self) -> DatasetSpec:
        return audio_visual_spec(self.cfg, EMOTIONS)

    def info(self) -> dict:
        return {"root": str(self.root), "cremad": self.cfg.model_dump(mode="json")}


class CremaD(Dataset):
    """CREMA-D: audio + video of actors speaking with one of 6 emotions (``data.cremad``)."""

    name = "cremad"
    Options = CremaDOptions
    modalities = ("audio", "visual")

    @classmethod
    def source(cls, cfg: Config) -> CremaDSource:
        return CremaDSource(cfg.data.path, cfg.data.options(CremaDOptions), cfg.seed)
