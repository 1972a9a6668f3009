"""Client samplers: which clients a round draws (``federation.sampler``; each one's settings at
``federation.<name>``). Registered in :data:`fedcmi.registry.SAMPLERS`: a module here with a
:class:`~fedcmi.samplers.base.Sampler` subclass, or an entry point in the group ``fedcmi.samplers``."""
