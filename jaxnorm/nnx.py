"""Flax NNX layers over jaxnorm's pure functions, drop-in for ``flax.nnx``'s norms."""
from jaxnorm._src.nnx_norms import BatchNorm
from jaxnorm._src.nnx_norms import GroupNorm
from jaxnorm._src.nnx_norms import InstanceNorm
from jaxnorm._src.nnx_norms import LayerNorm
from jaxnorm._src.nnx_norms import RMSNorm

__all__ = (
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
)
