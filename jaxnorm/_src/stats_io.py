"""Saving and loading dataset statistics: one JSON format per kind, validated, never pickled.

:func:`save_stats` writes a :class:`jaxnorm.Stats` (the per-channel numbers) or a
:class:`jaxnorm.StatsAccumulator` (the state that can still grow, sketches as base64 of
DataSketches' portable bytes). :func:`load_stats` reads either and gives ``Stats``;
:func:`load_accumulator` gives back the accumulator, so that statistics continued after loading
keep their quantiles. ``Stats.save``/``Stats.load`` and ``StatsAccumulator.save``/``load`` are
the same functions. A Stats file is one JSON object::

  {
    "format": "jaxnorm.Stats",
    "version": 2,
    "channels": 3,
    "channel_axis": -1,
    "ignore_nan": false,
    "count": [50176, 50176, 50176],
    "mean": [123.68, 116.78, 103.94],
    ...
  }

with one list of ``channels`` numbers for each of ``count, mean, var, std, min, max, median,
q25, q75, quantile_error`` (the last four ``null``, all together, without quantiles). Numbers are
written with Python's shortest exact float repr, so loading gives back the same float64 values.
"""
from __future__ import annotations

import os

from jaxnorm._src import accumulator as accumulator_lib
from jaxnorm._src import json_text
from jaxnorm._src import stats_result

FORMATS = (stats_result.FORMAT, accumulator_lib.FORMAT)


def save_stats(stats: stats_result.Stats | accumulator_lib.StatsAccumulator,
               path: str | os.PathLike) -> None:
  """Writes statistics or an accumulator to ``path`` as indented JSON (exact float64 values).

  Example:
    >>> import os, tempfile, numpy as np, jaxnorm
    >>> folder = tempfile.mkdtemp()
    >>> acc = jaxnorm.accumulate_stats(np.array([[0.0, 1.0], [2.0, 5.0]]))
    >>> jaxnorm.save_stats(acc, os.path.join(folder, "acc.json"))
    >>> acc = jaxnorm.load_accumulator(os.path.join(folder, "acc.json"))
    >>> acc.update(np.array([[4.0, 6.0]])).result().median
    array([2., 5.])
  """
  if isinstance(stats, stats_result.Stats):
    data = stats_result.to_dict(stats)
  elif isinstance(stats, accumulator_lib.StatsAccumulator):
    data = accumulator_lib.to_dict(stats)
  else:
    raise TypeError(f"save_stats writes jaxnorm.Stats or jaxnorm.StatsAccumulator, got "
                    f"{type(stats).__name__}")
  json_text.write(data, path)


def load_stats(path: str | os.PathLike) -> stats_result.Stats:
  """Reads a file of :func:`save_stats` (statistics or an accumulator) as :class:`Stats`.

  Raises:
    ValueError: the file is not JSON, a key is missing or unknown, a list has the wrong length,
      a value is NaN, infinite or not a number, a count is not an integer from 0 to 2**53,
      channel_axis is null for several channels, a sketch is corrupt, or the statistics
      contradict each other (say min > max, or a variance wider than [min, max] allows).
    OSError: the file cannot be read.
  """
  source = os.fspath(path)
  data = json_text.read(path)
  if isinstance(data, dict) and data.get("format") == accumulator_lib.FORMAT:
    acc = accumulator_lib.from_dict(data, source=source)
    if acc.moments is None:
      raise ValueError(f"{source}: the accumulator holds no data yet, so it has no statistics")
    return acc.result()
  return stats_result.from_dict(data, source=source)


def load_accumulator(path: str | os.PathLike) -> accumulator_lib.StatsAccumulator:
  """Reads an accumulator written by :func:`save_stats`, to update or merge it further.

  A Stats file without quantiles gives an accumulator of its moments; a Stats file with
  quantiles raises (it holds no sketch, so its quantiles could not be continued).
  """
  source = os.fspath(path)
  data = json_text.read(path)
  if isinstance(data, dict) and data.get("format") == stats_result.FORMAT:
    stats = stats_result.from_dict(data, source=source)
    if stats.has_quantiles:
      raise ValueError(
          f"{source}: holds Stats with quantiles but no sketch, so updates could not keep the "
          f"quantiles; save the accumulator instead (jaxnorm.save_stats(acc, path)), or load "
          f"these Stats with jaxnorm.load_stats")
    acc = accumulator_lib.StatsAccumulator(stats.channel_axis, ignore_nan=stats.ignore_nan,
                                           quantiles=False)
    acc.moments = stats.host_moments()
    return acc
  return accumulator_lib.from_dict(data, source=source)
