"""The code MLflow runs to load a logged fedcmi model ("models from code"): no pickled object is stored,
so loading a registered model runs this file and :mod:`fedcmi.serving`, never unpickled code."""

from mlflow.models import set_model

from fedcmi.serving import ModalityClassifier

set_model(ModalityClassifier())
