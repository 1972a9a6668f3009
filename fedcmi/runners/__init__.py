"""The executors of a federation, each a loop over :mod:`fedcmi.round`:

- :mod:`~fedcmi.runners.engine`: every round in this process (``fedcmi train``, ``dvc repro``);
- :mod:`~fedcmi.runners.store`: a round as steps of separate processes around a store on disk (what the
  Kubeflow components call);
- :mod:`~fedcmi.runners.files`: one part of a round from files to files (``fedcmi init``, ``sample``,
  ``client-train``, ``aggregate``, ``evaluate``).
"""
