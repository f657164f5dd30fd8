"""jaxnorm: normalization for JAX and Flax, with exact, stable, count-weighted statistics."""
from jaxnorm._src.batch_norm import BatchStats
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_norm import init_batch_stats
from jaxnorm._src.batch_norm import update_batch_stats
from jaxnorm._src.batch_norm_variants import ghost_batch_norm
from jaxnorm._src.batch_norm_variants import lp_batch_norm
from jaxnorm._src.stats_result import Stats
from jaxnorm._src.accumulator import StatsAccumulator
from jaxnorm._src.accumulator import accumulate_stats
from jaxnorm._src.dispatch import kernels
from jaxnorm._src.device_stats import device_stats
from jaxnorm._src.accumulator import fit_stats
from jaxnorm._src.process_merge import merge_across_processes
from jaxnorm._src.folding import fold_batch_norm
from jaxnorm._src.folding import fold_preceding_batch_norm
from jaxnorm._src.functional import group_norm
from jaxnorm._src.functional import instance_norm
from jaxnorm._src.functional import layer_norm
from jaxnorm._src.functional import normalize
from jaxnorm._src.functional import rms_norm
from jaxnorm._src.renorm import RenormSchedule
from jaxnorm._src.renorm import RenormStats
from jaxnorm._src.renorm import batch_renorm
from jaxnorm._src.renorm import init_renorm_stats
from jaxnorm._src.renorm import renorm_schedule
from jaxnorm._src.scalers import IMAGENET_MEAN
from jaxnorm._src.scalers import IMAGENET_STD
from jaxnorm._src.scalers import imagenet_standardize
from jaxnorm._src.scalers import inverse_minmax
from jaxnorm._src.scalers import inverse_rescale
from jaxnorm._src.scalers import inverse_robust
from jaxnorm._src.scalers import inverse_standardize
from jaxnorm._src.scalers import minmax
from jaxnorm._src.scalers import pixels_to_symmetric
from jaxnorm._src.scalers import pixels_to_unit
from jaxnorm._src.scalers import rescale
from jaxnorm._src.scalers import robust
from jaxnorm._src.scalers import standardize
from jaxnorm._src.moments import Moments
from jaxnorm._src.moments import moments
from jaxnorm._src.moments import reduce_moments
from jaxnorm._src.stats_io import load_accumulator
from jaxnorm._src.stats_io import load_stats
from jaxnorm._src.stats_io import save_stats
from jaxnorm._src.conditional_norms import ada_layer_norm
from jaxnorm._src.conditional_norms import ada_ln_zero
from jaxnorm._src.conditional_norms import adain
from jaxnorm._src.conditional_norms import conditional_batch_norm
from jaxnorm._src.conditional_norms import film
from jaxnorm._src.transformer_norms import add_layer_norm
from jaxnorm._src.transformer_norms import add_rms_norm
from jaxnorm._src.transformer_norms import head_norm
from jaxnorm._src.transformer_norms import qk_norm
from jaxnorm._src.weight_norms import SpectralState
from jaxnorm._src.weight_norms import conv_operator
from jaxnorm._src.response_norms import evonorm_b0
from jaxnorm._src.response_norms import evonorm_s0
from jaxnorm._src.response_norms import filter_response_norm
from jaxnorm._src.weight_norms import init_spectral_state
from jaxnorm._src.weight_norms import scaled_weight_standardize
from jaxnorm._src.weight_norms import spectral_norm
from jaxnorm._src.response_norms import tlu
from jaxnorm._src.weight_norms import weight_norm
from jaxnorm._src.weight_norms import weight_standardize

# The backend fast paths register themselves with the dispatch.
import jaxnorm._src.fast  # pylint: disable=unused-import

__version__ = "0.1.0"

__all__ = (
    "BatchStats",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Moments",
    "RenormSchedule",
    "RenormStats",
    "SpectralState",
    "Stats",
    "StatsAccumulator",
    "accumulate_stats",
    "ada_layer_norm",
    "ada_ln_zero",
    "adain",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_renorm",
    "conditional_batch_norm",
    "conv_operator",
    "device_stats",
    "evonorm_b0",
    "evonorm_s0",
    "film",
    "filter_response_norm",
    "fit_stats",
    "fold_batch_norm",
    "fold_preceding_batch_norm",
    "ghost_batch_norm",
    "group_norm",
    "head_norm",
    "imagenet_standardize",
    "init_batch_stats",
    "init_renorm_stats",
    "init_spectral_state",
    "instance_norm",
    "kernels",
    "inverse_minmax",
    "inverse_rescale",
    "inverse_robust",
    "inverse_standardize",
    "layer_norm",
    "load_accumulator",
    "load_stats",
    "lp_batch_norm",
    "merge_across_processes",
    "minmax",
    "moments",
    "normalize",
    "pixels_to_symmetric",
    "pixels_to_unit",
    "qk_norm",
    "reduce_moments",
    "renorm_schedule",
    "rescale",
    "rms_norm",
    "robust",
    "save_stats",
    "scaled_weight_standardize",
    "spectral_norm",
    "standardize",
    "tlu",
    "update_batch_stats",
    "weight_norm",
    "weight_standardize",
)
