"""Flax NNX layers over jaxnorm's pure functions, drop-in for ``flax.nnx``'s norms."""
from jaxnorm._src.nnx_batch_norms import BatchNorm
from jaxnorm._src.nnx_batch_norms import BatchRenorm
from jaxnorm._src.nnx_batch_norms import GhostBatchNorm
from jaxnorm._src.nnx_norms import GroupNorm
from jaxnorm._src.nnx_input import InputStat
from jaxnorm._src.nnx_norms import InstanceNorm
from jaxnorm._src.nnx_norms import LayerNorm
from jaxnorm._src.nnx_batch_norms import LpBatchNorm
from jaxnorm._src.nnx_input import MinMaxScale
from jaxnorm._src.nnx_norms import RMSNorm
from jaxnorm._src.nnx_input import RobustScale
from jaxnorm._src.nnx_input import Standardize
from jaxnorm._src.renorm import renorm_schedule

__all__ = (
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InputStat",
    "InstanceNorm",
    "LayerNorm",
    "LpBatchNorm",
    "MinMaxScale",
    "RMSNorm",
    "RobustScale",
    "Standardize",
    "renorm_schedule",
)
