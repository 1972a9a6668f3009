"""Kubeflow Pipelines components: one lightweight Python component per step of a round.

Each component is a thin call into :mod:`fedcmi.steps` (no training logic
here). They run in the project's image (:func:`make_components` takes it), and
models pass between them as KFP ``Model`` artifacts in the core's safetensors
format. The full config travels as one JSON string, ``params_json``; each
component points the config's data paths at its input artifacts.
"""

from fedcmi_components.tasks import make_components

__all__ = ["make_components"]
