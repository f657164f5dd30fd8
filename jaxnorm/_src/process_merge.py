"""Merging dataset statistics across JAX processes: ``merge_across_processes``.

Each process serializes its :class:`jaxnorm.StatsAccumulator` (validated JSON, sketches as
portable bytes), the bytes are all-gathered (their lengths first, then the buffers padded to the
longest) and every process merges all of them in process order.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable

import numpy as np

from jaxnorm._src import accumulator as accumulator_lib
from jaxnorm._src import stats_result


def _to_bytes(acc: accumulator_lib.StatsAccumulator) -> np.ndarray:
  text = json.dumps(accumulator_lib.to_dict(acc), allow_nan=False)
  return np.frombuffer(text.encode("utf-8"), np.uint8)


def merge_across_processes(
    part: accumulator_lib.StatsAccumulator | stats_result.Stats, *,
    gather: Callable[[np.ndarray], np.ndarray] | None = None) -> stats_result.Stats:
  """Merges every process's statistics of its part of the data, with two all-gathers.

  For multi-process JAX (after ``jax.distributed.initialize()``): each process fits its own
  files with :func:`jaxnorm.accumulate_stats`, then this gathers every accumulator (sketches
  included) with ``jax.experimental.multihost_utils.process_allgather`` and merges them in
  process order. Every process gets the statistics of all the data: moments exact, quantiles
  within the sketch's rank bound (exact while the sketches hold every value). With one process it
  returns the same statistics.

  Args:
    part: this process's :class:`jaxnorm.StatsAccumulator`, or :class:`jaxnorm.Stats` fitted
      with ``quantiles=False`` (Stats that hold quantiles keep no sketch to merge: they raise).
    gather: the all-gather to use (default ``process_allgather``); it maps a buffer to a stack
      of every process's buffer.

  Returns:
    The :class:`jaxnorm.Stats` of every process's data.
  """
  if isinstance(part, stats_result.Stats):
    if part.has_quantiles:
      raise ValueError(
          "merge_across_processes got Stats that hold quantiles, which keep no sketch to merge; "
          "pass the accumulator instead: acc = jaxnorm.accumulate_stats(batches); "
          "jaxnorm.merge_across_processes(acc) (or fit with quantiles=False)")
    acc = accumulator_lib.StatsAccumulator(part.channel_axis, ignore_nan=part.ignore_nan,
                                           quantiles=False)
    acc.moments = part.host_moments()
    part = acc
  if gather is None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    gather = functools.partial(multihost_utils.process_allgather, tiled=False)
  buffer = _to_bytes(part)
  lengths = np.asarray(gather(np.array([len(buffer)], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(buffer)] = buffer
  buffers = np.asarray(gather(padded))
  merged = None
  for length, data in zip(lengths, buffers):
    text = bytes(data[:int(length)]).decode("utf-8")
    other = accumulator_lib.from_dict(json.loads(text), source="a process's statistics")
    merged = other if merged is None else merged.merge(other)
  return merged.result()
