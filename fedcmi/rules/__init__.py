"""Aggregation rules: how the server combines a round's admitted updates, one module each.

A rule is a :class:`~fedcmi.rules.base.Rule` subclass with a ``name``; ``server.rule`` selects it and its
settings live at ``server.<name>``. Built-ins are the modules of this package; a rule from another package
registers through the entry-point group ``fedcmi.rules`` (see :mod:`fedcmi.registry`).
"""
