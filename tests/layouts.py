"""Tiny copies of CREMA-D, AVE and CrisisMMD in their exact distributed layouts.

Audio is written with the standard library's ``wave``, images with PIL,
videos with PyAV, split files as csv/txt/tsv. Each builder plants the faults
the loaders must survive (a corrupt file, an unknown label, a missing file, a
clip shorter than the audio length, frames named so that a plain string sort
would misorder them) and returns what it planted.
"""

from __future__ import annotations

import csv
import wave
from pathlib import Path

import numpy as np
from PIL import Image

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def write_wav(path: Path, seconds: float, freq: float, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    x = (0.4 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    if channels > 1:
        x = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())


def write_jpg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)


def class_color(k: int, shade: int = 0) -> tuple[int, int, int]:
    return ((60 * k + shade) % 256, (255 - 40 * k) % 256, (30 * k + 2 * shade) % 256)


def write_video(path: Path, seconds: int, fps: int, color_of_second, audio_freq: float | None = None,
                codec: str = "mpeg4", rate: int = 16000) -> None:
    """A video whose frames in second s have ``color_of_second(s)``, with an optional sine audio track."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = 48, 32, "yuv420p"
        audio = None
        if audio_freq is not None:
            audio = c.add_stream("aac", rate=rate)
            audio.layout = "mono"
        for i in range(seconds * fps):
            img = np.full((32, 48, 3), color_of_second(i // fps), np.uint8)
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in vs.encode():
            c.mux(packet)
        if audio is not None:
            t = np.arange(seconds * rate) / rate
            samples = (0.3 * np.sin(2 * np.pi * audio_freq * t)).astype(np.float32)[None]
            for k in range(0, samples.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(samples[:, k:k + 1024], format="flt", layout="mono")
                frame.sample_rate, frame.pts = rate, k
                for packet in audio.encode(frame):
                    c.mux(packet)
            for packet in audio.encode():
                c.mux(packet)


def cremad(root: Path, actors: int = 4) -> dict:
    """Clips ``<actor>_IEO_<EMO>_XX`` for every actor and emotion; returns what was planted."""
    clips = []
    for a in range(actors):
        for k, emo in enumerate(EMOTIONS):
            clip = f"{1001 + a}_IEO_{emo}_XX"
            clips.append(clip)
            seconds = 0.2 if (a, k) == (0, 1) else 0.6  # one clip shorter than the audio length: tiled
            write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, 300 + 150 * k)
            if (a, k) == (1, 2):  # frames only as a video: decoded with PyAV
                write_video(root / "VideoFlash" / f"{clip}.flv", 2, 10, lambda s, k=k: class_color(k, 10 * s),
                            codec="flv")
                continue
            for i in (1, 2, 10):  # '10' after '2': a plain string sort would put it first
                write_jpg(root / "Image-01-FPS" / clip / f"{i:d}.jpg", class_color(k, 10 * i))
    broken = f"{1001}_IEO_ANG_XX"
    (root / "AudioWAV" / f"{broken}.wav").write_bytes(b"RIFF\x00\x00not a wav at all")
    test = [c for c in clips if c.startswith(str(1000 + actors))]
    train = [c for c in clips if c not in test]
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for c in train:
            w.writerow([c, c.split("_")[2]])
        w.writerow(["1002_IEO_XXX_XX", "XXX"])  # a label outside the six emotions
    with open(root / "test.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([c, c.split("_")[2]] for c in test)
    # the raters' votes, as processedResults/summaryTable.csv holds them: a letter, or two on a tie
    votes = {c: {"NEU": "N", "HAP": "H", "SAD": "S", "ANG": "A", "FEA": "F", "DIS": "D:F"}[c.split("_")[2]]
             for c in clips}
    votes["1003_IEO_HAP_XX"] = "N"  # the raters heard neutral: the vote, not the clip name, is the label
    (root / "processedResults").mkdir(exist_ok=True)
    with open(root / "processedResults" / "summaryTable.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "FileName", "VoiceVote", "VoiceLevel", "FaceVote", "FaceLevel", "MultiModalVote",
                    "MultiModalLevel"])
        for i, c in enumerate(clips):
            w.writerow([i, c, votes[c], 50, votes[c], 50, votes[c], 60])
    return {"clips": clips, "train": train, "test": test, "broken": broken, "video_only": "1002_IEO_SAD_XX",
            "unknown": "1002_IEO_XXX_XX", "votes": votes}


AVE_CATEGORIES = ("Church bell", "Bark", "Male speech, man speaking")


def ave(root: Path) -> dict:
    """AVE_Dataset: videos with sound, event segments, one video pre-extracted to wav and frames."""
    rows = {"train": [], "val": [], "test": []}
    plan = [("train", 0, 0, 2), ("train", 1, 1, 3), ("train", 2, 0, 3), ("train", 0, 1, 3), ("train", 1, 0, 2),
            ("train", 2, 1, 2), ("val", 0, 0, 3), ("test", 1, 0, 3), ("test", 2, 1, 3)]
    for n, (split, k, start, end) in enumerate(plan):
        vid = f"v{n:03d}-{AVE_CATEGORIES[k][:4].replace(' ', '_')}"
        if n == 3:  # extracted beforehand: audio/<id>.wav and frames/<id>/<i>.jpg at 1 fps
            write_wav(root / "audio" / f"{vid}.wav", 3, 400 + 200 * k)
            for s in range(3):
                write_jpg(root / "frames" / vid / f"{s + 1}.jpg", class_color(k, 10 * s))
        else:
            write_video(root / "AVE" / f"{vid}.mp4", 3, 8, lambda s, k=k: class_color(k, 10 * s), 400 + 200 * k)
        rows[split].append(f"{AVE_CATEGORIES[k]}&{vid}&good&{start}&{end}")
    rows["test"].append("Helicopter&v999-heli&good&0&3")  # a category absent from the training list
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (root / name).write_text("\n".join(rows[split]) + "\n")
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                          + "\n".join(r for v in rows.values() for r in v) + "\n")
    return {"rows": rows, "extracted": "v003-Bark"}


CRISIS_COLUMNS = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text", "label_image",
                  "label_text_image"]


def crisismmd(root: Path, task: str = "informative") -> dict:
    """CrisisMMD_v2.0 with the three task tsv files and the images they name."""
    labels = (["informative", "not_informative"] if task == "informative"
              else ["affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
                    "rescue_volunteering_or_donation_effort"])
    words = [["flood", "water", "rescue", "damage"], ["lunch", "music", "weekend", "happy"],
             ["injured", "hospital", "dead"], ["donate", "volunteer", "help"]]
    split_dir = root / "crisismmd_datasplit_all"
    split_dir.mkdir(parents=True)
    planted = {}
    for split, n in (("train", 16), ("dev", 4), ("test", 6)):
        rows = []
        for i in range(n):
            k = i % len(labels)
            tid = f"9{len(split)}{i:04d}"
            image = f"data_image/hurricane_harvey/1_9_2017/{tid}_0.jpg"
            if not (split == "train" and i == 5):  # one image missing on disk
                write_jpg(root / image, class_color(k, i))
            text = f"RT @user{i}: " + " ".join(words[k]) + f" #harvey https://t.co/x{i}"
            rows.append(["hurricane_harvey", tid, f"{tid}_0", text, image, labels[k], labels[k], labels[k],
                         "Positive"])
        if split == "train":
            rows.append(["hurricane_harvey", "999", "999_0", "what is this", rows[0][4], "nonsense_label", "", "", ""])
            planted["missing_image"] = rows[5][2]
        with open(split_dir / f"task_{task}_text_img_{split}.tsv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            w.writerow(CRISIS_COLUMNS)
            w.writerows(rows)
    return {"labels": labels, **planted}


def glove(path: Path, dim: int = 6, header: bool = False) -> Path:
    """A word-vectors file in the GloVe text format (fastText's when ``header``)."""
    rng = np.random.default_rng(0)
    vocab = ["flood", "water", "rescue", "damage", "lunch", "music", "weekend", "happy", "donate", "help", "#harvey"]
    lines = [f"{len(vocab)} {dim}"] if header else []
    lines += [w + " " + " ".join(f"{v:.4f}" for v in rng.standard_normal(dim)) for w in vocab]
    path.write_text("\n".join(lines) + "\n")
    return path
