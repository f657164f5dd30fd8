"""Flax Linen layers over jaxnorm's pure functions, drop-in for ``flax.linen``'s norms."""
from jaxnorm._src.linen_batch_variants import BatchRenorm
from jaxnorm._src.linen_batch_variants import GhostBatchNorm
from jaxnorm._src.linen_batch_variants import LpBatchNorm
from jaxnorm._src.freezing import batch_norm_param_labels
from jaxnorm._src.freezing import batch_norm_param_mask
from jaxnorm._src.freezing import frozen_batch_norm
from jaxnorm._src.linen_input import MinMaxScale
from jaxnorm._src.linen_input import RobustScale
from jaxnorm._src.linen_input import Standardize
from jaxnorm._src.convert_linen import use_jaxnorm
from jaxnorm._src.folding_layers import fold_batch_norms
from jaxnorm._src.folding_layers import fold_preceding_batch_norms
from jaxnorm._src.linen_norms import BatchNorm
from jaxnorm._src.linen_norms import GroupNorm
from jaxnorm._src.linen_norms import InstanceNorm
from jaxnorm._src.linen_norms import LayerNorm
from jaxnorm._src.linen_norms import RMSNorm
from jaxnorm._src.population import recompute_batch_stats
from jaxnorm._src.renorm import renorm_schedule
from jaxnorm._src.linen_transformer_norms import AdaLNZero
from jaxnorm._src.linen_transformer_norms import AddLayerNorm
from jaxnorm._src.linen_transformer_norms import AddRMSNorm
from jaxnorm._src.linen_transformer_norms import ConditionalBatchNorm
from jaxnorm._src.linen_transformer_norms import FiLM
from jaxnorm._src.linen_transformer_norms import HeadNorm
from jaxnorm._src.linen_transformer_norms import QKNorm
from jaxnorm._src.linen_transformer_norms import QKNormAttention
from jaxnorm._src.linen_weight_norms import EvoNormB0
from jaxnorm._src.linen_weight_norms import EvoNormS0
from jaxnorm._src.linen_weight_norms import FilterResponseNorm
from jaxnorm._src.linen_weight_norms import ScaledStdConv
from jaxnorm._src.linen_weight_norms import SpectralNorm
from jaxnorm._src.linen_weight_norms import StdConv
from jaxnorm._src.linen_weight_norms import TLU
from jaxnorm._src.linen_weight_norms import WeightNorm

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
    "InstanceNorm",
    "LayerNorm",
    "LpBatchNorm",
    "MinMaxScale",
    "QKNorm",
    "QKNormAttention",
    "RMSNorm",
    "RobustScale",
    "ScaledStdConv",
    "SpectralNorm",
    "Standardize",
    "StdConv",
    "TLU",
    "WeightNorm",
    "batch_norm_param_labels",
    "batch_norm_param_mask",
    "frozen_batch_norm",
    "recompute_batch_stats",
    "fold_batch_norms",
    "fold_preceding_batch_norms",
    "renorm_schedule",
    "use_jaxnorm",
)
