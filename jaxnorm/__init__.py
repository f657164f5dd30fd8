"""jaxnorm: normalization for JAX and Flax, with exact, stable, count-weighted statistics."""
from jaxnorm._src.batch_norm import BatchStats
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_norm import init_batch_stats
from jaxnorm._src.batch_norm import update_batch_stats
from jaxnorm._src.batch_norm_variants import ghost_batch_norm
from jaxnorm._src.batch_norm_variants import lp_batch_norm
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
from jaxnorm._src.stats import Moments
from jaxnorm._src.stats import moments
from jaxnorm._src.stats import reduce_moments

__version__ = "0.1.0"

__all__ = (
    "BatchStats",
    "Moments",
    "RenormSchedule",
    "RenormStats",
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "init_batch_stats",
    "init_renorm_stats",
    "instance_norm",
    "layer_norm",
    "lp_batch_norm",
    "moments",
    "normalize",
    "reduce_moments",
    "renorm_schedule",
    "rms_norm",
    "update_batch_stats",
)
