"""jaxnorm: normalization for JAX and Flax, with exact, stable, count-weighted statistics."""
from jaxnorm._src.batch_norm import BatchStats
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_norm import init_batch_stats
from jaxnorm._src.batch_norm import update_batch_stats
from jaxnorm._src.functional import group_norm
from jaxnorm._src.functional import instance_norm
from jaxnorm._src.functional import layer_norm
from jaxnorm._src.functional import normalize
from jaxnorm._src.functional import rms_norm
from jaxnorm._src.stats import Moments
from jaxnorm._src.stats import moments
from jaxnorm._src.stats import reduce_moments

__version__ = "0.1.0"

__all__ = (
    "BatchStats",
    "Moments",
    "batch_norm",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "reduce_moments",
    "rms_norm",
    "update_batch_stats",
)
