"""A federated round, in one place, for every executor.

- :mod:`~fedcmi.round.update`: what a client sends (:class:`ClientUpdate`) and the federation state;
- :mod:`~fedcmi.round.schedule`: which clients a round samples, which rounds are evaluated;
- the server pipeline (:mod:`~fedcmi.round.server`), one stage per file: :mod:`~fedcmi.round.admission`,
  :mod:`~fedcmi.round.clipping`, :mod:`~fedcmi.round.client_state`, :mod:`~fedcmi.round.aggregate` (the
  rule from :mod:`fedcmi.rules`), :mod:`~fedcmi.round.server_optimizer`;
- :mod:`~fedcmi.round.record`: the typed :class:`RoundRecord`; :mod:`~fedcmi.round.sinks`: where it goes;
- :mod:`~fedcmi.round.ledger`: committed rounds, checkpoints, the divergence guard;
- :mod:`~fedcmi.round.close`: :func:`close_round`, the tail every executor calls.

This package's ``__init__`` imports nothing, so any module may import one of its parts.
"""
