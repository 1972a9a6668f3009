"""Datasets, one module each (:class:`~fedcmi.datasets.base.Dataset` subclasses): the embedded synthetic
set, bring-your-own ``npz`` files, CREMA-D, AVE and CrisisMMD.

Adding a dataset is one file in this package holding a ``Dataset`` subclass with a ``name`` (its settings
at ``data.<name>``, its modalities, its source); from another installed package, an entry point in the
group ``fedcmi.datasets``. :data:`fedcmi.registry.DATASETS` finds both.
"""
