"""Flax Linen layers over jaxnorm's pure functions, drop-in for ``flax.linen``'s norms."""
from jaxnorm._src.linen_batch_variants import BatchRenorm
from jaxnorm._src.linen_batch_variants import GhostBatchNorm
from jaxnorm._src.linen_batch_variants import LpBatchNorm
from jaxnorm._src.linen_input import MinMaxScale
from jaxnorm._src.linen_input import RobustScale
from jaxnorm._src.linen_input import Standardize
from jaxnorm._src.linen_norms import BatchNorm
from jaxnorm._src.linen_norms import GroupNorm
from jaxnorm._src.linen_norms import InstanceNorm
from jaxnorm._src.linen_norms import LayerNorm
from jaxnorm._src.linen_norms import RMSNorm
from jaxnorm._src.renorm import renorm_schedule

__all__ = (
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LpBatchNorm",
    "MinMaxScale",
    "RMSNorm",
    "RobustScale",
    "Standardize",
    "renorm_schedule",
)
