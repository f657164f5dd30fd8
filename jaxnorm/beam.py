"""jaxnorm on Apache Beam: dataset statistics as a ``PTransform`` (``pip install jaxnorm[beam]``)."""
from jaxnorm._src.beam_stats import FitStats
from jaxnorm._src.beam_stats import StatsCombineFn

__all__ = (
    "FitStats",
    "StatsCombineFn",
)
