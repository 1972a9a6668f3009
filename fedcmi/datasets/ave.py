"""AVE (Tian et al., "Audio-Visual Event Localization in Unconstrained Videos", ECCV 2018).

28 event classes; each 10 s video has one annotated event segment, and audio
and frames are taken inside it (audio tiled to ``audio_seconds``). Layout, under
``data.path`` (the ``AVE_Dataset`` folder as distributed)::

    trainSet.txt, valSet.txt, testSet.txt   rows ``Category&VideoID&Quality&Start&End``
    AVE/<VideoID>.mp4                       the videos, decoded with PyAV (pip install 'fedcmi[video]'), or
    audio/<VideoID>.wav                     audio extracted beforehand (data.ave.audio_dir), and
    frames/<VideoID>/<n>.jpg                frames extracted beforehand at data.ave.fps (data.ave.frames_dir)

Classes are the categories of the training list, sorted; a category met only
in the validation or test list is reported as an unknown label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from fedcmi.config import Config, Float, Int
from fedcmi.data.base import DataError, DatasetSpec
from fedcmi.data.cache import AudioVisualOptions, Record, RecordSource, Skipped, audio_visual_spec
from fedcmi.data.media import (
    MediaError,
    audio_features,
    load_frames,
    read_wav,
    sorted_images,
    video_audio,
    video_frames,
)
from fedcmi.datasets.base import Dataset


class AVEOptions(AudioVisualOptions):
    """AVE: 28 event classes; audio and frames inside each annotated event segment."""

    audio_seconds: Float = Field(10.0, gt=0, le=600)
    frames: Int = Field(4, ge=1, le=64)
    audio_dir: str = "audio"
    frames_dir: str = "frames"
    video_dir: str = "AVE"
    train_list: str = "trainSet.txt"
    val_list: str = "valSet.txt"
    test_list: str = "testSet.txt"


class AVESource(RecordSource):
    def __init__(self, root: Path, cfg: AVEOptions) -> None:
        self.root, self.cfg = Path(root), cfg
        c = cfg
        self.layout = (f"  {self.root}/{c.train_list}, {c.val_list}, {c.test_list}: rows "
                       "'Category&VideoID&Quality&Start&End'\n"
                       f"  {self.root}/{c.video_dir}/<VideoID>.mp4, or {self.root}/{c.audio_dir}/<VideoID>.wav and "
                       f"{self.root}/{c.frames_dir}/<VideoID>/<n>.jpg")
        self.classes: tuple[str, ...] = ()

    def _read_list(self, name: str) -> list[tuple[str, str, float, float, str]]:
        """(category, video id, start, end, line) per annotated row."""
        path = self.require(self.root / name, "the AVE annotation list")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parts = line.strip().split("&")
            if len(parts) < 5 or parts[1].lower() == "videoid":  # blank or header lines
                continue
            try:
                start, end = float(parts[3]), float(parts[4])
            except ValueError:
                raise DataError(f"{path}, line {n}: start and end must be seconds, got {parts[3]!r} and "
                                f"{parts[4]!r}") from None
            rows.append((parts[0].strip(), parts[1].strip(), start, end, f"{name}:{n}"))
        if not rows:
            raise DataError(f"{path} holds no 'Category&VideoID&Quality&Start&End' rows")
        return rows

    def records(self) -> tuple[dict[str, list[Record]], list[Skipped]]:
        self.require(self.root, "the AVE root folder")
        c = self.cfg
        lists = {"train": self._read_list(c.train_list), "test": self._read_list(c.test_list)}
        if (self.root / c.val_list).is_file():
            lists["val"] = self._read_list(c.val_list)
        self.classes = tuple(sorted({row[0] for row in lists["train"]}))
        out: dict[str, list[Record]] = {}
        skipped: list[Skipped] = []
        for split, rows in lists.items():
            recs = []
            for category, vid, start, end, where in rows:
                key = f"{vid}@{where}"
                if category not in self.classes:
                    skipped.append(Skipped(split, key, f"unknown label {category!r}: not a category of {c.train_list}"))
                elif not 0 <= start < end:
                    skipped.append(Skipped(split, key, f"empty event segment [{start}, {end})"))
                else:
                    recs.append(Record(split, key, self.classes.index(category),
                                       {"video_id": vid, "start": start, "end": end}))
            out[split] = recs
        return out, skipped

    def decode(self, record: Record) -> dict[str, np.ndarray]:
        c = self.cfg
        vid, start, end = record.fields["video_id"], record.fields["start"], record.fields["end"]
        video = self.root / c.video_dir / f"{vid}.mp4"
        wav = self.root / c.audio_dir / f"{vid}.wav"
        if wav.is_file():
            x, rate = read_wav(wav)
            x = x[int(start * rate): int(end * rate)]
            if x.size == 0:
                raise MediaError(f"{wav}: no audio inside the event segment [{start}, {end}) s")
        elif video.is_file():
            x, rate = video_audio(video, c.sample_rate, start, end), c.sample_rate
        else:
            raise MediaError(f"no audio for {vid}: neither {wav} nor {video}")
        audio = audio_features(x, rate, c.sample_rate, c.audio_seconds, c.nperseg, c.noverlap)
        frames = sorted_images(self.root / c.frames_dir / vid)
        if frames:
            # frame i was taken at i / fps seconds: keep those inside the event segment
            inside = [f for i, f in enumerate(frames) if start * c.fps <= i < end * c.fps]
            if not inside:
                raise MediaError(f"{self.root / c.frames_dir / vid}: no frame inside the event segment "
                                 f"[{start}, {end}) s at {c.fps} fps")
            visual = load_frames(inside, c.frames, c.frame_size)
        elif video.is_file():
            visual = video_frames(video, c.frames, c.frame_size, c.fps, start, end)
        else:
            raise MediaError(f"no frames for {vid}: neither {self.root / c.frames_dir / vid} nor {video}")
        return {"audio": audio, "visual": visual}

    def spec(self) -> DatasetSpec:
        return audio_visual_spec(self.cfg, self.classes)

    def info(self) -> dict:
        return {"root": str(self.root), "ave": self.cfg.model_dump(mode="json")}


class AVE(Dataset):
    """AVE: 28 audio-visual event classes, audio and frames inside each annotated segment (``data.ave``)."""

    name = "ave"
    Options = AVEOptions
    modalities = ("audio", "visual")

    @classmethod
    def source(cls, cfg: Config) -> AVESource:
        return AVESource(cfg.data.path, cfg.data.options(AVEOptions))
