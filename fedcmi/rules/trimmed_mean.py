"""The coordinate-wise trimmed mean (Yin et al., ICML 2018), per modality group."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.rules.base import CoordinateWise


class TrimmedMeanOptions(BaseModel):
    """``server.trimmed_mean``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    trim_fraction: float = Field(0.2, ge=0, lt=0.5, strict=True, description="share of the clients dropped at "
                                 "each end of every coordinate (rounded down; at least one value is kept)")


class TrimmedMean(CoordinateWise):
    """The mean of each coordinate's values without the ``trim_fraction`` largest and smallest."""

    name = "trimmed_mean"
    Options = TrimmedMeanOptions

    def middle(self, ordered: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.options, TrimmedMeanOptions)
        n = len(ordered)
        k = min(int(self.options.trim_fraction * n), (n - 1) // 2)
        return ordered[k:n - k]
