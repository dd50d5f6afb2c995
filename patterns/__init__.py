"""truthfuse's built-in rule library (import name `truthfuse_patterns`; folder `patterns/`).

Written only with the public authoring API (`fusion_backend.Rule`, `maybe`, the constraint
helpers), the same one users have. Importing this package registers its rules.
"""
from . import attention, feedforward, sdpa  # noqa: F401

__all__ = ["attention", "feedforward", "sdpa"]
