"""Training for the ``longpo`` and ``solopo`` stages."""
