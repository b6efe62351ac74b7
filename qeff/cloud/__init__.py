"""Aliases for users of the seed product: ``python -m qeff.cloud.infer`` and ``python -m qeff.cloud.execute``."""
