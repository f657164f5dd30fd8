"""Flax NNX layers over jaxnorm's pure functions, drop-in for ``flax.nnx``'s norms."""
from jaxnorm._src.convert_nnx import convert
from jaxnorm._src.folding_layers import fold_into_layer
from jaxnorm._src.folding_layers import fold_into_next_layer
from jaxnorm._src.nnx_batch_norms import BatchNorm
from jaxnorm._src.nnx_batch_norms import BatchRenorm
from jaxnorm._src.nnx_batch_norms import GhostBatchNorm
from jaxnorm._src.freezing import batch_norm_param_filter
from jaxnorm._src.nnx_norms import GroupNorm
from jaxnorm._src.nnx_input import InputStat
from jaxnorm._src.nnx_norms import InstanceNorm
from jaxnorm._src.nnx_norms import LayerNorm
from jaxnorm._src.nnx_batch_norms import LpBatchNorm
from jaxnorm._src.nnx_input import MinMaxScale
from jaxnorm._src.nnx_norms import RMSNorm
from jaxnorm._src.nnx_input import RobustScale
from jaxnorm._src.nnx_input import Standardize
from jaxnorm._src.population_nnx import recompute_batch_stats
from jaxnorm._src.renorm import renorm_schedule
from jaxnorm._src.nnx_transformer_norms import AdaLNZero
from jaxnorm._src.nnx_transformer_norms import AddLayerNorm
from jaxnorm._src.nnx_transformer_norms import AddRMSNorm
from jaxnorm._src.nnx_transformer_norms import ConditionalBatchNorm
from jaxnorm._src.nnx_transformer_norms import FiLM
from jaxnorm._src.nnx_transformer_norms import HeadNorm
from jaxnorm._src.nnx_transformer_norms import QKNorm
from jaxnorm._src.nnx_weight_norms import EvoNormB0
from jaxnorm._src.nnx_weight_norms import EvoNormS0
from jaxnorm._src.nnx_weight_norms import FilterResponseNorm
from jaxnorm._src.nnx_weight_norms import ScaledStdConv
from jaxnorm._src.nnx_weight_norms import SpectralNorm
from jaxnorm._src.nnx_weight_norms import StdConv
from jaxnorm._src.nnx_weight_norms import TLU
from jaxnorm._src.nnx_weight_norms import WeightNorm

__all__ = (
    "AdaLNZero",
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FiLM",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "HeadNorm",
    "InputStat",
    "InstanceNorm",
    "LayerNorm",
    "LpBatchNorm",
    "MinMaxScale",
    "QKNorm",
    "RMSNorm",
    "RobustScale",
    "ScaledStdConv",
    "SpectralNorm",
    "Standardize",
    "StdConv",
    "TLU",
    "WeightNorm",
    "batch_norm_param_filter",
    "recompute_batch_stats",
    "convert",
    "fold_into_layer",
    "fold_into_next_layer",
    "renorm_schedule",
)
