"""Decoding audio, images and video into the arrays the prepared cache holds.

Audio: a mono waveform at ``sample_rate``, tiled when short and cut to a
fixed length, then ``scipy.signal.spectrogram`` -> log(S + 1e-7) ->
per-clip standardisation (as the FedCMI reference code does for CREMA-D and
AVE). Frames: RGB, resized, uint8 C x H x W, picked evenly and
deterministically from the naturally sorted frame list. Videos are decoded
with PyAV (``pip install fedcmi[video]``) when frames or audio have not been
extracted beforehand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcmi.errors import FedcmiError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class MediaError(FedcmiError, ValueError):
    """A file that cannot be decoded; the sample is skipped and reported."""


# -- audio -------------------------------------------------------------------------------------------
def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A WAV file as a mono float32 waveform in [-1, 1], and its sample rate: integer PCM of 8 to 32 bits
    or IEEE float, plain or WAVE_FORMAT_EXTENSIBLE (what recorders and editors write besides 16-bit PCM)."""
    import warnings

    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown extra chunks are skipped
            rate, data = wavfile.read(str(path))
    except (ValueError, EOFError, OSError) as exc:
        raise MediaError(f"{path}: not a readable WAV file ({exc})") from None
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype == np.int16:
        x = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:  # 24-bit samples come left-aligned in int32
        x = (data.astype(np.float64) / float(1 << 31)).astype(np.float32)
    elif data.dtype in (np.float32, np.float64):
        x = data.astype(np.float32)
        if not np.isfinite(x).all():
            raise MediaError(f"{path}: the audio holds NaN or Inf samples")
    else:
        raise MediaError(f"{path}: unsupported sample type {data.dtype}")
    if x.ndim > 1:
        x = x.mean(axis=1)
    if x.size == 0:
        raise MediaError(f"{path}: no audio samples")
    return x, int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling to ``target`` Hz."""
    if rate == target:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Tile a short waveform until it holds ``n`` samples, then cut it there (never fails on short clips)."""
    if x.size == 0:
        raise MediaError("no audio samples in the clip")
    if x.size < n:
        x = np.tile(x, int(math.ceil(n / x.size)))
    return x[:n]


def log_spectrogram(x: np.ndarray, rate: int, nperseg: int, noverlap: int) -> np.ndarray:
    """(1, nperseg // 2 + 1, frames) float32: log power spectrogram, standardised per clip."""
    from scipy.signal import spectrogram

    _, _, spec = spectrogram(x, fs=rate, nperseg=nperseg, noverlap=noverlap)
    spec = np.log(spec + 1e-7)
    spec = (spec - spec.mean()) / (spec.std() + 1e-9)
    return spec.astype(np.float32)[None]


def spectrogram_shape(rate: int, seconds: float, nperseg: int, noverlap: int) -> tuple[int, int, int]:
    """The shape :func:`log_spectrogram` gives for a waveform of ``seconds`` at ``rate``."""
    n = int(seconds * rate)
    return (1, nperseg // 2 + 1, (n - noverlap) // (nperseg - noverlap))


def audio_features(x: np.ndarray, rate: int, sample_rate: int, seconds: float, nperseg: int,
                   noverlap: int) -> np.ndarray:
    """Waveform -> resampled, tiled/cut, log spectrogram."""
    x = fit_length(resample(x, rate, sample_rate), int(seconds * sample_rate))
    return log_spectrogram(x, sample_rate, nperseg, noverlap)


# -- images and frames ------------------------------------------------------------------------------------
def natural_key(name: str) -> list:
    """'frame_2.jpg' before 'frame_10.jpg': digits compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def sorted_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` in natural order (never the file system's listing order)."""
    if not folder.is_dir():
        return []
    images = (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(images, key=lambda p: natural_key(p.name))


def pick_evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``n`` items (the middle of each of k equal stretches); repeats when n < k."""
    if n <= 0:
        raise MediaError("no frames to pick from")
    return [min(int((i + 0.5) * n / k), n - 1) for i in range(k)]


def image_to_array(img, size: int) -> np.ndarray:
    """A PIL image -> uint8 3 x size x size."""
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_to_array(img, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def load_frames(paths: Sequence[Path], k: int, size: int) -> np.ndarray:
    """``k`` frames picked evenly from ``paths`` (already in order): uint8 k x 3 x size x size."""
    return np.stack([load_image(paths[i], size) for i in pick_evenly(len(paths), k)])


# -- video (PyAV) -------------------------------------------------------------------------------------
def _av():
    try:
        import av
    except ImportError:
        raise MediaError("decoding videos needs PyAV: pip install 'fedcmi[video]' (or extract frames and audio "
                         "beforehand into the layout the README gives)") from None
    return av


def video_frames(path: Path, k: int, size: int, fps: int = 1, start: float = 0.0,
                 end: float | None = None) -> np.ndarray:
    """``k`` frames picked evenly among the video's frames at ``fps`` (the first frame of each 1/fps
    interval) within [start, end) seconds: uint8 k x 3 x size x size."""
    av = _av()
    picked: list = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            slot = -1
            for frame in container.decode(stream):
                t = float(frame.time if frame.time is not None else 0.0)
                if t < start:
                    continue
                if end is not None and t >= end:
                    break
                s = int((t - start) * fps)
                if s != slot:
                    slot = s
                    picked.append(image_to_array(frame.to_image(), size))
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise MediaError(f"{path}: not a readable video ({exc.__class__.__name__}: {exc})") from None
    if not picked:
        raise MediaError(f"{path}: no video frames between {start} s and {end} s")
    return np.stack([picked[i] for i in pick_evenly(len(picked), k)])


def video_audio(path: Path, sample_rate: int, start: float = 0.0, end: float | None = None) -> np.ndarray:
    """The video's audio track as a mono float32 waveform at ``sample_rate``, within [start, end) seconds."""
    av = _av()
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio track")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"{path}: not a readable audio track ({exc.__class__.__name__}: {exc})") from None
    x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    x = x[int(start * sample_rate): None if end is None else int(end * sample_rate)]
    if x.size == 0:
        raise MediaError(f"{path}: no audio between {start} s and {end} s")
    return x.astype(np.float32)
