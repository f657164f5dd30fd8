"""Dataset statistics on Apache Beam: ``FitStats``, a ``PTransform`` over a ``CombineFn``.

The combiner's accumulator is :class:`jaxnorm.StatsAccumulator`: each worker folds its elements
in with ``update``, Beam merges the workers' accumulators with ``merge`` (in any order and
grouping) and ``extract_output`` gives one :class:`jaxnorm.Stats`. Between workers an accumulator
travels as its validated JSON object (sketches as DataSketches' portable bytes), so the same
pipeline runs on the DirectRunner, Dataflow, Flink or Spark, as TensorFlow Transform's analyzers
do on Beam.
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np

from jaxnorm._src import accumulator as accumulator_lib
from jaxnorm._src import quantile_sketch


class StatsCombineFn(beam.CombineFn):
  """Combines arrays (or records holding one) into :class:`jaxnorm.Stats`.

  Args:
    channel_axis: the channel axis of each array (None: one channel over all values).
    field: where the element is a record (a dict, or an object with attributes), the name of
      the field holding the array; None when elements are arrays.
    ignore_nan, quantiles, k: as in :func:`jaxnorm.fit_stats`.
    output: ``"stats"`` for :class:`jaxnorm.Stats`, ``"accumulator"`` for the
      :class:`jaxnorm.StatsAccumulator` (to merge with other pipelines' or save).
  """

  def __init__(self, channel_axis: int | None = -1, *, field: str | None = None,
               ignore_nan: bool = False, quantiles: bool = True,
               k: int = quantile_sketch.DEFAULT_K, output: str = "stats"):
    super().__init__()
    if output not in ("stats", "accumulator"):
      raise ValueError(f"output={output!r} must be 'stats' or 'accumulator'")
    accumulator_lib.StatsAccumulator(channel_axis, k=k)  # checks k now, not on a worker
    self.channel_axis = channel_axis
    self.field = field
    self.ignore_nan = ignore_nan
    self.quantiles = quantiles
    self.k = k
    self.output = output

  def create_accumulator(self) -> accumulator_lib.StatsAccumulator:
    return accumulator_lib.StatsAccumulator(self.channel_axis, ignore_nan=self.ignore_nan,
                                            quantiles=self.quantiles, k=self.k)

  def _array(self, element: Any) -> np.ndarray:
    if self.field is None:
      if isinstance(element, dict):
        raise ValueError(
            f"FitStats got a record with fields {sorted(element)[:8]}; name the field holding "
            f"the array: jaxnorm.beam.FitStats(field='...')")
      return np.asarray(element)
    try:
      value = element[self.field] if isinstance(element, dict) else getattr(element, self.field)
    except (KeyError, AttributeError):
      fields = sorted(element) if isinstance(element, dict) else type(element).__name__
      raise ValueError(f"FitStats(field={self.field!r}): a record has no such field; it holds "
                       f"{fields}") from None
    return np.asarray(value)

  def add_input(self, accumulator, element):
    return accumulator.update(self._array(element))

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for other in accumulators:
      merged.merge(other)
    return merged

  def compact(self, accumulator):
    return accumulator

  def extract_output(self, accumulator):
    if accumulator.moments is None:
      raise ValueError("FitStats got an empty PCollection; give at least one array")
    if self.output == "accumulator":
      return accumulator
    return accumulator.result()


class FitStats(beam.PTransform):
  """Per-channel statistics of a PCollection of arrays: a PCollection of one :class:`Stats`.

  Equal to :func:`jaxnorm.fit_stats` over all the elements: moments exact (Chan's formulas in
  float64, merged in any order), quantiles within the KLL sketch's rank bound
  (``Stats.quantile_error``, at most 9.9e-4), exact for 8-bit data.

  Args:
    channel_axis: the channel axis of each array, e.g. -1 for (N, F) rows or (N, H, W, C)
      images; None for one channel over all values.
    field: the field holding the array where elements are records (dicts or objects).
    ignore_nan: skip NaNs; otherwise a NaN fails the pipeline with a ValueError.
    quantiles: compute median, q25, q75 and the percentiles.
    k: the KLL sketch size.
    output: ``"stats"`` (default) or ``"accumulator"``.

  Example:
    >>> import apache_beam as beam, numpy as np, jaxnorm.beam
    >>> with beam.Pipeline() as pipeline:
    ...   stats = (pipeline | beam.Create([np.array([[1.0], [2.0]]), np.array([[6.0]])])
    ...            | jaxnorm.beam.FitStats())
    ...   _ = stats | beam.Map(lambda s: print(s.mean, s.median))
    [3.] [2.]
  """

  def __init__(self, channel_axis: int | None = -1, *, field: str | None = None,
               ignore_nan: bool = False, quantiles: bool = True,
               k: int = quantile_sketch.DEFAULT_K, output: str = "stats"):
    super().__init__()
    self._combine = StatsCombineFn(channel_axis, field=field, ignore_nan=ignore_nan,
                                   quantiles=quantiles, k=k, output=output)

  def expand(self, pcoll):
    return pcoll | beam.CombineGlobally(self._combine)
