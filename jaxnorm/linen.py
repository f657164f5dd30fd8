"""Flax Linen layers over jaxnorm's pure functions, drop-in for ``flax.linen``'s norms."""
from jaxnorm._src.linen_norms import BatchNorm
from jaxnorm._src.linen_norms import GroupNorm
from jaxnorm._src.linen_norms import InstanceNorm
from jaxnorm._src.linen_norms import LayerNorm
from jaxnorm._src.linen_norms import RMSNorm

__all__ = (
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
)
