"""MLflow: tracking a federation's run and registering its model, one job per module.

- :mod:`~fedcmi.tracking.server`: where the tracking server is and whether it answers;
- :mod:`~fedcmi.tracking.calls`: calls that survive the server going away (queued, replayed, budgeted);
- :mod:`~fedcmi.tracking.run`: one MLflow run per federation, whoever executes it (its record file,
  ``mlflow_run.json``, is this module's);
- :mod:`~fedcmi.tracking.sink`: a round's typed record as MLflow metrics;
- :mod:`~fedcmi.tracking.inputs`: the prepared data as the run's input, and its hash;
- :mod:`~fedcmi.tracking.model_registry`: registered versions, aliases and the champion;
- :mod:`~fedcmi.tracking.cli`: ``fedcmi register``.

This package's ``__init__`` imports nothing (MLflow loads only where it is used).
"""
