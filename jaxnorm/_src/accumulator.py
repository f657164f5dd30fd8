"""The streaming state of dataset statistics: ``StatsAccumulator``, ``accumulate_stats``,
``fit_stats``.

A :class:`StatsAccumulator` holds, per channel, the exact float64 moments (count, mean, sum of
squared deviations, minimum, maximum; see :mod:`jaxnorm._src.host_moments`), and for the
quantiles exact value counts of 8-bit data or a KLL sketch (:mod:`jaxnorm._src.quantile_sketch`).
It grows with :meth:`~StatsAccumulator.update`, joins another part with
:meth:`~StatsAccumulator.merge` (in any order: the moments exactly, the quantiles within the
sketch's rank bound), gives a :class:`jaxnorm.Stats` with :meth:`~StatsAccumulator.result`, and
is written as validated JSON (sketches as base64 of DataSketches' portable bytes; never pickled),
so processes and pipelines (``jaxnorm.beam.FitStats``) can exchange it.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from jaxnorm._src import host_moments
from jaxnorm._src import json_text
from jaxnorm._src import quantile_sketch
from jaxnorm._src import stats_result

FORMAT = "jaxnorm.StatsAccumulator"
VERSION = 1
_KEYS = ("format", "version", "channels", "channel_axis", "ignore_nan", "quantiles", "k",
         "count", "mean", "m2", "min", "max", "exact_counts", "sketches")


class StatsAccumulator:
  """Mergeable, serializable running statistics of a dataset, per channel.

  ``update`` and ``merge`` change the accumulator in place and return it (so calls chain).

  Args:
    channel_axis: the channel axis of the batches (-1 for (N, F) and (N, H, W, C), 1 for
      (N, C, H, W)); None for one channel over all values.
    ignore_nan: skip NaNs (like ``np.nanmean``); otherwise a NaN raises a ValueError.
    quantiles: also keep what the quantiles need (exact counts or a KLL sketch per channel).
    k: the KLL sketch's size parameter: rank error about :math:`2.3 / k^{0.97}` (the default
      2900 gives at most 9.9e-4), memory about 24 bytes times ``k`` per channel.

  Example:
    >>> import numpy as np, jaxnorm
    >>> a = jaxnorm.StatsAccumulator().update(np.array([[1.0], [2.0]]))
    >>> b = jaxnorm.StatsAccumulator().update(np.array([[3.0], [10.0]]))
    >>> stats = a.merge(b).result()
    >>> stats.count, stats.mean, stats.median
    (array([4]), array([4.]), array([2.5]))
  """

  def __init__(self, channel_axis: int | None = -1, *, ignore_nan: bool = False,
               quantiles: bool = True, k: int = quantile_sketch.DEFAULT_K):
    if not 8 <= k <= 65535:
      raise ValueError(f"k={k} must lie in [8, 65535]; the default {quantile_sketch.DEFAULT_K} "
                       f"gives a rank error of at most 1e-3")
    self.channel_axis = channel_axis
    self.ignore_nan = bool(ignore_nan)
    self.quantiles = bool(quantiles)
    self.k = int(k)
    self.moments: host_moments.HostMoments | None = None
    self.exact_counts: np.ndarray | None = None  # (C, EXACT_SIZE) int64
    self.sketches: list | None = None  # one KLL sketch per channel, once float data came

  @property
  def channels(self) -> int | None:
    """The number of channels (None before the first batch)."""
    return None if self.moments is None else len(self.moments.count)

  def _start(self, channels: int) -> None:
    if self.moments is None:
      self.moments = host_moments.empty(channels)
      if self.quantiles:
        self.exact_counts = np.zeros((channels, host_moments.EXACT_SIZE), np.int64)
    elif channels != self.channels:
      raise ValueError(
          f"a batch of {channels} channels cannot join statistics of {self.channels} channels; "
          f"every batch must have the same number of channels along channel_axis="
          f"{self.channel_axis}")

  def _ensure_sketches(self) -> None:
    """Moves exact counts into sketches, once data that cannot be counted exactly comes."""
    if self.sketches is None:
      self.sketches = [quantile_sketch.new_sketch(self.k) for _ in range(self.channels)]
      quantile_sketch.spill_counts(self.sketches, self.exact_counts)
      self.exact_counts = np.zeros_like(self.exact_counts)

  def update(self, batch: ArrayLike) -> StatsAccumulator:
    """Adds one batch (NumPy or JAX array of any real dtype, channels along ``channel_axis``)."""
    if np.ndim(batch) == 1 and self.channel_axis is not None and np.size(batch) > 1:
      warnings.warn(
          f"a 1-d batch of shape {np.shape(batch)} is read as ONE row of {np.size(batch)} "
          f"channels (channel_axis={self.channel_axis}); for {np.size(batch)} values of one "
          f"feature pass x[:, None] or channel_axis=None", stacklevel=2)
    x = host_moments.channels_last(np.asarray(batch), self.channel_axis)
    moments, counts = host_moments.batch_moments(x, ignore_nan=self.ignore_nan)
    self._start(x.shape[1])
    if x.shape[0] == 0:
      return self
    self.moments = host_moments.merge(self.moments, moments)
    if self.quantiles:
      if counts is not None and self.sketches is None:
        self.exact_counts += counts
      elif counts is not None:
        quantile_sketch.spill_counts(self.sketches, counts)
      else:
        self._ensure_sketches()
        quantile_sketch.update_sketches(self.sketches, x, ignore_nan=self.ignore_nan)
    return self

  def merge(self, other: StatsAccumulator) -> StatsAccumulator:
    """Adds the data of ``other`` (left unchanged): any order of merges gives the same moments."""
    if not isinstance(other, StatsAccumulator):
      raise TypeError(f"merge takes a StatsAccumulator, got {type(other).__name__}; "
                      f"for Stats without quantiles use stats.merge")
    if (other.channel_axis, other.quantiles, other.k) != (self.channel_axis, self.quantiles,
                                                           self.k):
      raise ValueError(
          f"cannot merge an accumulator of channel_axis={other.channel_axis}, quantiles="
          f"{other.quantiles}, k={other.k} into one of channel_axis={self.channel_axis}, "
          f"quantiles={self.quantiles}, k={self.k}; create both with the same settings")
    if other.moments is None:
      return self
    self._start(other.channels)
    self.ignore_nan = self.ignore_nan or other.ignore_nan
    self.moments = host_moments.merge(self.moments, other.moments)
    if self.quantiles:
      if other.sketches is not None or self.sketches is not None:
        self._ensure_sketches()
        quantile_sketch.spill_counts(self.sketches, other.exact_counts)
        for mine, theirs in zip(self.sketches, other.sketches or ()):
          mine.merge(theirs)
      else:
        self.exact_counts += other.exact_counts
    return self

  def copy(self) -> StatsAccumulator:
    """An independent copy."""
    return from_dict(to_dict(self))

  def quantile(self, q: ArrayLike) -> np.ndarray:
    """NumPy's linear ``q`` quantiles (``q`` in [0, 1]) per channel, shape ``q.shape + (C,)``.

    Exact for 8-bit data and while a channel's sketch holds all its values; otherwise the rank
    of each value is within :meth:`quantile_error` of ``q`` (99% confidence).
    """
    if not self.quantiles:
      raise ValueError("this accumulator keeps no quantiles; create it with quantiles=True")
    if self.moments is None:
      raise ValueError("this accumulator holds no data yet; update it with batches first")
    q = np.asarray(q, np.float64)
    if np.any(np.isnan(q)) or np.any((q < 0) | (q > 1)):
      raise ValueError(f"quantiles q={q} must lie in [0, 1]; for percentiles divide by 100")
    if self.sketches is None:
      values = np.stack([quantile_sketch.counts_quantile(self.exact_counts, p) for p in q.ravel()])
    else:
      values = np.stack([quantile_sketch.sketch_quantiles(s, q.ravel()) for s in self.sketches], 1)
    return values.reshape(q.shape + (self.channels,))

  def quantile_error(self) -> np.ndarray:
    """Per channel, the normalized rank error bound of :meth:`quantile` (0 where exact)."""
    if self.sketches is None:
      return np.zeros(self.channels)
    return np.array([quantile_sketch.sketch_error(s) for s in self.sketches])

  def result(self) -> stats_result.Stats:
    """The :class:`jaxnorm.Stats` of the data so far (quantiles when kept)."""
    if self.moments is None:
      raise ValueError("this accumulator holds no data yet; update it with batches first")
    quantiles = None
    if self.quantiles:
      percentiles = self.quantile(np.arange(stats_result.PERCENTS) / 100)
      quantiles = {"median": percentiles[50], "q25": percentiles[25], "q75": percentiles[75],
                   "quantile_error": self.quantile_error(),
                   "percentiles": np.ascontiguousarray(percentiles.T)}
    return stats_result.from_moments(self.moments, channel_axis=self.channel_axis,
                                     ignore_nan=self.ignore_nan, quantiles=quantiles)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the accumulator as JSON (see :func:`jaxnorm.save_stats`)."""
    json_text.write(to_dict(self), path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> StatsAccumulator:
    """Reads an accumulator written by :meth:`save` (see :func:`jaxnorm.load_accumulator`)."""
    return from_dict(json_text.read(path), source=os.fspath(path))

  # Beam and multiprocessing move accumulators between processes with pickle: they travel as
  # their validated JSON object (sketches as portable bytes), which DataSketches can read.
  def __getstate__(self) -> dict[str, Any]:
    return to_dict(self)

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(from_dict(state).__dict__)

  def __repr__(self) -> str:
    return (f"StatsAccumulator(channels={self.channels}, channel_axis={self.channel_axis}, "
            f"quantiles={self.quantiles}, sketched={self.sketches is not None})")


def to_dict(acc: StatsAccumulator) -> dict[str, Any]:
  """The JSON object of an accumulator: moments as exact floats, sketches as base64 text."""
  data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "channels": acc.channels,
                          "channel_axis": acc.channel_axis, "ignore_nan": acc.ignore_nan,
                          "quantiles": acc.quantiles, "k": acc.k}
  if acc.moments is None:
    return data | {name: None for name in _KEYS[7:]}
  m = acc.moments
  empty = m.count == 0
  data |= {"count": [int(c) for c in m.count], "mean": [float(v) for v in m.mean],
           "m2": [float(v) for v in m.m2],
           "min": [None if e else float(v) for e, v in zip(empty, m.min)],
           "max": [None if e else float(v) for e, v in zip(empty, m.max)]}
  data["exact_counts"] = None if acc.exact_counts is None else [
      [[int(host_moments.EXACT_VALUES[i]), int(row[i])] for i in np.flatnonzero(row)]
      for row in acc.exact_counts]
  data["sketches"] = None if acc.sketches is None else [
      quantile_sketch.to_text(s) for s in acc.sketches]
  return data


def from_dict(data: Any, *, source: str = "accumulator") -> StatsAccumulator:
  """Validates a JSON object and returns the accumulator it holds; ValueError if malformed."""
  def fail(message: str):
    raise ValueError(f"{source}: {message}")

  stats_result.check_header(data, source, FORMAT, (VERSION,))
  for name in ("quantiles", "ignore_nan"):
    if not isinstance(data.get(name), bool):
      fail(f"'{name}' must be true or false, got {data.get(name)!r}")
  k = data.get("k")
  if not isinstance(k, int) or isinstance(k, bool):
    fail(f"'k' must be an integer, got {k!r}")
  try:
    acc = StatsAccumulator(data.get("channel_axis"), ignore_nan=data["ignore_nan"],
                           quantiles=data["quantiles"], k=k)
  except ValueError as error:
    fail(str(error))
  if data.get("channels") is None:
    if any(data.get(name) is not None for name in _KEYS[7:]):
      fail("'channels' is null (no data yet) but statistics are given")
    return acc
  channels, acc.channel_axis, acc.ignore_nan = stats_result.check_layout(data, source, _KEYS)
  count = stats_result.check_counts(stats_result.numbers(data, "count", channels, source),
                                    source, allow_zero=True)
  mean, m2 = (stats_result.numbers(data, name, channels, source) for name in ("mean", "m2"))
  lo, hi = (stats_result.numbers(data, name, channels, source, allow_null_items=True)
            for name in ("min", "max"))
  if np.any(np.isnan(lo) != (count == 0)) or np.any(np.isnan(hi) != (count == 0)):
    fail("'min' and 'max' must be null exactly where 'count' is 0")
  lo, hi = np.where(count == 0, np.inf, lo), np.where(count == 0, -np.inf, hi)
  if np.any(m2 < 0) or np.any(lo > hi) or np.any((count > 0) & ((mean < lo) | (mean > hi))):
    fail("the moments contradict each other (negative 'm2', 'min' above 'max', or 'mean' "
         "outside [min, max]); the file was edited or corrupted")
  acc.moments = host_moments.HostMoments(count, mean, m2, lo, hi)
  if not acc.quantiles:
    if data["exact_counts"] is not None or data["sketches"] is not None:
      fail("'quantiles' is false but counts or sketches are given")
    return acc
  acc.exact_counts = _read_counts(data["exact_counts"], channels, fail)
  total = acc.exact_counts.sum(1)
  if data["sketches"] is not None:
    texts = data["sketches"]
    if not isinstance(texts, list) or len(texts) != channels or not all(
        isinstance(t, str) for t in texts):
      fail(f"'sketches' must be null or a list of {channels} base64 strings")
    try:
      acc.sketches = [quantile_sketch.from_text(t) for t in texts]
    except ValueError as error:
      fail(f"'sketches': {error}")
    if any(s.k != acc.k for s in acc.sketches):
      fail(f"'sketches' must all have k={acc.k}")
    total = total + np.array([s.n for s in acc.sketches])
  if np.any(total != count):
    fail("the quantile counts (exact counts plus sketch sizes) differ from 'count'; the file "
         "was edited or corrupted")
  return acc


def _read_counts(value: Any, channels: int, fail) -> np.ndarray:
  counts = np.zeros((channels, host_moments.EXACT_SIZE), np.int64)
  if value is None:
    return counts
  if not isinstance(value, list) or len(value) != channels:
    fail(f"'exact_counts' must be null or a list of {channels} lists of [value, count] pairs")
  for channel, pairs in enumerate(value):
    for pair in pairs if isinstance(pairs, list) else [None]:
      if not (isinstance(pair, list) and len(pair) == 2 and all(
          isinstance(v, int) and not isinstance(v, bool) for v in pair)
              and host_moments.EXACT_FIRST <= pair[0] < host_moments.EXACT_FIRST
              + host_moments.EXACT_SIZE and pair[1] > 0):
        fail(f"'exact_counts' of channel {channel} must be [value, count] pairs of integers, "
             f"values in [-128, 255], counts above 0; got {pair!r}")
      counts[channel, pair[0] - host_moments.EXACT_FIRST] += pair[1]
  return counts


def accumulate_stats(batches: Iterable[ArrayLike] | ArrayLike, *, channel_axis: int | None = -1,
                     ignore_nan: bool = False, quantiles: bool = True,
                     k: int = quantile_sketch.DEFAULT_K, progress: bool = False,
                     total: int | None = None) -> StatsAccumulator:
  """A :class:`StatsAccumulator` over ``batches`` (arguments as :func:`fit_stats`).

  Keep it to add data later (``update``), to join other parts (``merge``), or to save it.

  Example:
    >>> import numpy as np, jaxnorm
    >>> acc = jaxnorm.accumulate_stats([np.array([[1.0], [3.0]])])
    >>> acc.update(np.array([[5.0]])).result().median
    array([3.])
  """
  if isinstance(batches, (np.ndarray, jax.Array)):
    batches = [batches]
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  acc = StatsAccumulator(channel_axis, ignore_nan=ignore_nan, quantiles=quantiles, k=k)
  iterator = iter(batches)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    iterator = tqdm(iterator, total=total, unit="batch", desc="fit_stats")
  rows = 0
  try:
    for number, batch in enumerate(iterator):
      try:
        acc.update(batch)
      except ValueError as error:
        raise ValueError(f"batch {number} of shape {np.shape(batch)}: {error}") from None
      rows += int(np.prod(np.shape(batch))) > 0
  finally:
    if progress:
      iterator.close()  # ends the bar's line, also when a batch fails
  if acc.moments is None:
    raise ValueError("fit_stats got no batch; give an iterable of arrays, or one array")
  if not rows:
    raise ValueError(
        f"fit_stats got only empty batches (no rows, e.g. shape (0, {acc.channels})); give "
        f"batches with at least one row")
  empty = np.flatnonzero(acc.moments.count == 0).tolist()
  if empty:
    raise ValueError(
        f"channel(s) {empty[:8]} hold no value (every value is NaN); drop those channels or "
        f"fill the NaNs before fitting")
  return acc


def fit_stats(batches: Iterable[ArrayLike] | ArrayLike, *, channel_axis: int | None = -1,
              ignore_nan: bool = False, quantiles: bool = True,
              k: int = quantile_sketch.DEFAULT_K, progress: bool = False,
              total: int | None = None) -> stats_result.Stats:
  """Exact per-channel statistics of a dataset given as batches, streamed one batch at a time.

  .. math::

     \\mu_c = \\frac{1}{n}\\sum_i x_{i,c}, \\qquad
     \\sigma_c^2 = \\frac{1}{n}\\sum_i (x_{i,c} - \\mu_c)^2

  over every value of channel :math:`c` in every batch, merged with Chan's parallel formulas in
  float64: equal to NumPy's float64 statistics of the concatenated data. Median, q25 and q75
  are NumPy's linear quantiles: exact for 8-bit data and for channels of up to a few thousand
  values, otherwise from a KLL sketch whose normalized rank error is at most
  ``Stats.quantile_error`` (9.9e-4 with the default ``k``, 99% confidence) whatever the data.

  Args:
    batches: an iterable of arrays (NumPy or JAX, any real dtype), or a single array. Each has
      the channels along ``channel_axis``; the other axes (and their sizes) may vary.
    channel_axis: the channel axis, e.g. -1 for (N, F) tables and (N, H, W, C) images, 1 for
      (N, C, H, W); None for one channel over all values. A 1-d array with ``channel_axis=-1``
      is ONE row of N channels; pass ``x[:, None]`` (or ``channel_axis=None``) for N values of
      one feature.
    ignore_nan: skip NaNs (like ``np.nanmean``); otherwise a NaN raises a ValueError.
    quantiles: compute median, q25 and q75.
    k: the KLL sketch size (see :class:`StatsAccumulator`).
    progress: show a tqdm progress bar, with a total where ``len(batches)`` or ``total`` is known.
    total: the number of batches, for the progress bar.

  Returns:
    A :class:`jaxnorm.Stats` (a pytree). To add data later or merge parts, keep the accumulator
    (:func:`accumulate_stats`) instead.

  Raises:
    ValueError: no batch, only empty batches (no rows), channel counts that differ, infinities,
      NaNs (unless ignored), or a channel without a single value.

  Example:
    >>> import numpy as np, jaxnorm
    >>> batches = [np.array([[1.0, 10.0], [3.0, 30.0]]), np.array([[5.0, 50.0]])]
    >>> stats = jaxnorm.fit_stats(batches)
    >>> stats.mean, stats.var, stats.median
    (array([ 3., 30.]), array([  2.66666667, 266.66666667]), array([ 3., 30.]))
  """
  return accumulate_stats(batches, channel_axis=channel_axis, ignore_nan=ignore_nan,
                          quantiles=quantiles, k=k, progress=progress, total=total).result()
