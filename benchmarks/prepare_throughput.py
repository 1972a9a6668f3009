"""Preparation of CREMA-D at full size: time and cache size, measured on generated clips in the real layout.

    python benchmarks/prepare_throughput.py --clips 120 --workers 1 2

Writes ``--clips`` clips as CREMA-D distributes them (``AudioWAV/<clip>.wav``,
16 kHz 16-bit mono, 2-4 s long; ``Image-01-FPS/<clip>/<n>.jpg``, three 480 x 360
frames; ``train.csv`` / ``test.csv``), then runs ``prepare`` with the paper's
settings (257 x 299 log spectrograms; 1 and 3 frames at 224 x 224), and
extrapolates to the 7442 clips of the real dataset. The real clips hold
speech and faces rather than noise, so their JPEG decoding differs a little;
the cache size per clip is exact. Prints the figures and writes
benchmarks/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
from common import RESULTS, save_results

from fedcmi.config import config_from_dict
from fedcmi.data import prepare

CREMAD_CLIPS = 7442
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def write_layout(root: Path, clips: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"{1001 + i // 6}_IEO_{EMOTIONS[i % 6]}_XX" for i in range(clips)]
    for name in names:
        n = int(rng.uniform(2.0, 4.0) * 16000)
        audio = (0.1 * rng.standard_normal(n) * 32767).astype("<i2")
        (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
        with wave.open(str(root / "AudioWAV" / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(audio.tobytes())
        folder = root / "Image-01-FPS" / name
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)  # smooth-ish content, like a face on a backdrop
        for k in range(3):
            img = Image.fromarray(base).resize((480, 360), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            (folder / f"{k + 1:05d}.jpg").write_bytes(buf.getvalue())
    cut = int(0.9 * clips)
    for split, rows in (("train", names[:cut]), ("test", names[cut:])):
        with open(root / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([n, n.split("_")[2]] for n in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=120)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--out", default=str(RESULTS / "prepare_throughput.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcmi-prepare-"))
    root = work / "CREMA-D"
    t0 = time.perf_counter()
    write_layout(root, args.clips)
    print(f"wrote {args.clips} clips in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for frames in args.frames:
        for workers in args.workers:
            cfg = config_from_dict({"data": {"name": "cremad", "path": str(root), "prepared_dir": str(work / "prep"),
                                             "workers": workers, "cremad": {"frames": frames}}})
            info = prepare(cfg)
            per_clip = info["seconds"] / args.clips
            row = {"frames": frames, "workers": workers, "seconds": info["seconds"],
                   "clips_per_second": round(args.clips / info["seconds"], 2),
                   "cache_bytes_per_clip": round(info["bytes"] / args.clips),
                   "extrapolated_minutes_for_7442_clips": round(per_clip * CREMAD_CLIPS / 60, 1),
                   "extrapolated_cache_gib_for_7442_clips": round(info["bytes"] / args.clips * CREMAD_CLIPS / 2**30, 2),
                   "shapes": info["shapes"]}
            rows.append(row)
            print(f"frames {frames}, workers {workers}: {row['clips_per_second']} clips/s, "
                  f"{row['cache_bytes_per_clip'] / 1024:.0f} KiB per clip -> 7442 clips: "
                  f"{row['extrapolated_minutes_for_7442_clips']} min, "
                  f"{row['extrapolated_cache_gib_for_7442_clips']} GiB",
                  flush=True)
    save_results(Path(args.out), {"clips": args.clips, "rows": rows})


if __name__ == "__main__":
    main()
