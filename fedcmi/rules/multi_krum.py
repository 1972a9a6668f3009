"""Multi-Krum (Blanchard et al., NeurIPS 2017, section 5), per modality group: the mean of the ``m``
best-scored updates under Krum's score, ``m`` = ``select`` or, when unset, ``n - f`` (the paper's
choice): between Krum's robustness (m = 1) and the mean's averaging (m = n)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedcmi.rules.krum import Krum


class MultiKrumOptions(BaseModel):
    """``server.multi_krum``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    byzantine: int = Field(1, ge=0, le=10_000, strict=True, description="f: the lying clients per group the "
                           "rule is to withstand")
    select: int | None = Field(None, ge=1, le=100_000, strict=True, description="m: updates averaged per group "
                               "(at most the group's clients); null: n - f")


class MultiKrum(Krum):
    """The mean of the ``m`` updates per group with the lowest Krum scores."""

    name = "multi_krum"
    Options = MultiKrumOptions  # type: ignore[assignment]

    def selected(self, n: int) -> int:
        m = getattr(self.options, "select", None)
        return max(1, min(n, m if m is not None else n - self.byzantine))
