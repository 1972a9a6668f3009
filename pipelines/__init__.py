"""Kubeflow pipelines built from params.yaml (see :mod:`fedcmi_pipelines.federated`)."""
