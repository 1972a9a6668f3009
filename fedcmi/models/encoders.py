"""Encoders E_m: one modality's input to a d-vector.

``mlp`` for vectors, ``cnn`` for C x H x W maps, ``clip`` for T x 3 x H x W
frames (each frame encoded, then averaged over time), ``resnet18`` for real
data on GPUs (maps with any channel count, or clips of frames), ``text`` for
token ids (a trainable embedding and 1-D convolutions; nothing downloaded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedcmi.errors import FedcmiError


class EncoderError(FedcmiError, ValueError):
    """An encoder kind that does not fit its modality's shape."""


class MLPEncoder(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], dim: int, width: int) -> None:
        super().__init__()
        hidden = max(4 * width, dim)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNNEncoder(nn.Module):
    """Three conv blocks and global average pooling: small enough for CPU runs."""

    def __init__(self, channels: int, dim: int, width: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out = nn.Sequential(nn.Linear(4 * w, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class ResNet18Encoder(nn.Module):
    """torchvision ResNet18 (random init) with ``channels`` inputs; 512-d, projected if ``dim`` differs."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.proj = nn.Identity() if dim == 512 else nn.Linear(512, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(x))


class ClipEncoder(nn.Module):
    """Runs a frame encoder on B*T frames and averages over time."""

    def __init__(self, frame_encoder: nn.Module) -> None:
        super().__init__()
        self.frame = frame_encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        h = self.frame(x.reshape(b * t, *x.shape[2:]))
        return h.reshape(b, t, -1).mean(dim=1)


class TextEncoder(nn.Module):
    """Token ids (0 = padding) -> embedding -> 1-D convolutions of widths 3, 4, 5 -> max over time -> d
    (Kim, "Convolutional Neural Networks for Sentence Classification", EMNLP 2014)."""

    def __init__(self, vocab_size: int, dim: int, width: int) -> None:
        super().__init__()
        emb = max(4 * width, 32)
        self.embed = nn.Embedding(vocab_size, emb, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(emb, 2 * width, k, padding=k // 2) for k in (3, 4, 5))
        self.out = nn.Sequential(nn.Linear(6 * width, dim), nn.ReLU())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)  # B x E x L
        pooled = [torch.relu(conv(x)).amax(dim=2) for conv in self.convs]
        return self.out(torch.cat(pooled, dim=1))


def build_encoder(kind: str, shape: tuple[int, ...], dim: int, width: int, modality: str = "?",
                  vocab_size: int | None = None) -> nn.Module:
    """The encoder ``kind`` for inputs of ``shape`` (without the batch axis); ``vocab_size`` marks token ids."""
    if (kind == "text") != (vocab_size is not None):
        if kind == "text":
            raise EncoderError(f"model.encoders.{modality}: 'text' needs token ids, but {modality} holds "
                               f"numbers of shape {shape}; use 'mlp'")
        raise EncoderError(f"model.encoders.{modality}: {modality} holds token ids; use 'text'")
    if kind == "text":
        assert vocab_size is not None
        return TextEncoder(vocab_size, dim, width)
    if kind == "mlp":
        return MLPEncoder(shape, dim, width)
    if kind == "cnn":
        if len(shape) != 3:
            raise EncoderError(f"model.encoders.{modality}: 'cnn' needs C x H x W inputs, {modality} has shape {shape}")
        return CNNEncoder(shape[0], dim, width)
    if kind == "clip":
        if len(shape) != 4:
            raise EncoderError(
                f"model.encoders.{modality}: 'clip' needs T x C x H x W frames, {modality} has shape {shape}")
        return ClipEncoder(CNNEncoder(shape[1], dim, width))
    if kind == "resnet18":
        if len(shape) == 3:
            return ResNet18Encoder(shape[0], dim)
        if len(shape) == 4:
            return ClipEncoder(ResNet18Encoder(shape[1], dim))
        raise EncoderError(f"model.encoders.{modality}: 'resnet18' needs maps or frames, {modality} has shape {shape}")
    raise EncoderError(f"model.encoders.{modality}: unknown encoder {kind!r}")
