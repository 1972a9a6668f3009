"""The networks and their parts: encoders per modality, fusion heads, and the multimodal networks the
algorithms train (each algorithm builds its own: :meth:`fedcmi.algorithms.base.Strategy.build_network`)."""

from __future__ import annotations

from fedcmi.models.encoders import EncoderError, build_encoder
from fedcmi.models.networks import FedCMINet, FusionNet, MultimodalNet, Output

__all__ = ["FedCMINet", "FusionNet", "MultimodalNet", "Output", "EncoderError", "build_encoder"]
