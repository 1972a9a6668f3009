"""fedcmi: balanced multimodal federated learning by cross-modal infiltration (Fan et al., arXiv 2401.00894)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fedcmi")
except _metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
