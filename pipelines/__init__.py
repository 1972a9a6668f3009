"""Kubeflow pipelines built from params.yaml (see :mod:`pipelines.federated`)."""
