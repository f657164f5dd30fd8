"""``Stats``: per-channel statistics of a dataset, a plain pytree of arrays.

What :func:`jaxnorm.fit_stats` returns and the scalers and input layers read. It holds numbers
only (no sketch, no hidden state), so it passes through ``jax.jit``, ``jax.device_put`` and
``jax.tree.map`` whole. The streaming state that can still grow (moments, exact counts and
quantile sketches) is :class:`jaxnorm.StatsAccumulator`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

from jaxnorm._src import host_moments
from jaxnorm._src import json_text

QUANTILE_FIELDS = ("median", "q25", "q75", "quantile_error", "percentiles")
PERCENTS = 101  # percentiles 0, 1, ..., 100
ARRAY_FIELDS = ("count", "mean", "var", "std", "min", "max") + QUANTILE_FIELDS


@dataclasses.dataclass(frozen=True, eq=False)
class Stats:
  """Per-channel statistics of a dataset (biased variance, NumPy's linear quantiles).

  Every field has shape ``(C,)``, one value per channel, but ``percentiles``, ``(C, 101)``.
  ``median``, ``q25``, ``q75``, ``quantile_error`` and ``percentiles`` are None when fitted with
  ``quantiles=False`` or by :func:`jaxnorm.device_stats`. A pytree: the eleven per-channel fields
  are its leaves, ``channel_axis`` and ``ignore_nan`` its static data, so ``jax.jit``,
  ``jax.device_put`` and ``jax.tree.map`` keep every number.

  Attributes:
    count: number of values per channel (integers; NaNs excluded with ``ignore_nan=True``).
    mean, var, std: mean, biased variance and its square root.
    min, max: extremes.
    median, q25, q75: the 50th, 25th and 75th percentiles (NumPy's linear method).
    quantile_error: the normalized rank error bound of the quantiles: the value given for the
      quantile ``q`` has a rank within ``quantile_error * count`` of ``q * count`` in the data
      (99% confidence; see :mod:`jaxnorm._src.quantile_sketch`), 0 where exact (8-bit integer
      data, and channels of up to a few thousand values).
    percentiles: ``(C, 101)``, the 0th, 1st, ..., 100th percentiles, within the same rank bound
      (what :meth:`quantile` answers from).
    channel_axis: the axis of the input holding the channels (None: one channel for all).
    ignore_nan: whether NaNs were skipped.

  Example:
    >>> import jax, numpy as np, jaxnorm
    >>> stats = jaxnorm.fit_stats(np.array([[0, 10], [255, 30]], np.uint8))
    >>> stats.count, stats.mean, stats.median
    (array([2, 2]), array([127.5,  20. ]), array([127.5,  20. ]))
    >>> jax.tree.map(lambda a: a * 2, stats).median
    array([255.,  40.])
  """
  count: Any
  mean: Any
  var: Any
  std: Any
  min: Any
  max: Any
  median: Any = None
  q25: Any = None
  q75: Any = None
  quantile_error: Any = None
  percentiles: Any = None
  channel_axis: int | None = -1
  ignore_nan: bool = False

  @property
  def channels(self) -> int:
    """The number of channels."""
    return int(np.shape(self.mean)[0])

  @property
  def has_quantiles(self) -> bool:
    """Whether median, q25 and q75 are known."""
    return self.median is not None

  def quantile(self, q: ArrayLike) -> Any:
    """The ``q`` quantiles per channel, shape ``q.shape + (C,)``, for ``q`` in whole percent.

    Read from :attr:`percentiles` (within ``quantile_error`` in rank); works on traced
    statistics too. Other ``q`` (say 0.125) need the accumulator's
    :meth:`jaxnorm.StatsAccumulator.quantile`, which answers any ``q`` within the bound.
    """
    q = np.asarray(q, np.float64)
    if np.any(np.isnan(q)) or np.any((q < 0) | (q > 1)):
      raise ValueError(f"quantiles q={q} must lie in [0, 1]; for percentiles divide by 100")
    index = np.rint(q * 100).astype(int)
    if np.any(np.abs(q * 100 - index) > 1e-9):
      raise ValueError(
          f"Stats keep the percentiles 0, 1, ..., 100; q={q} asks for others: use the "
          f"accumulator, jaxnorm.accumulate_stats(batches).quantile(q), which answers any q")
    if self.percentiles is None:
      known = {25: self.q25, 50: self.median, 75: self.q75}
      if self.median is None or any(i not in known for i in index.ravel()):
        raise ValueError(
            "these Stats hold no percentiles (fitted with quantiles=False, by device_stats, or "
            "read from a version-1 file); fit with jaxnorm.fit_stats(..., quantiles=True)")
      values = [known[i] for i in index.ravel()]
    else:
      values = [self.percentiles[:, i] for i in index.ravel()]
    xp = np if all(isinstance(v, np.ndarray) for v in values) else jax.numpy
    return xp.stack(values).reshape(q.shape + (self.channels,))

  def host_moments(self) -> host_moments.HostMoments:
    """Count, mean, sum of squared deviations, min and max as float64 NumPy arrays."""
    count = np.rint(np.asarray(self.count, np.float64)).astype(np.int64)
    return host_moments.HostMoments(count, np.asarray(self.mean, np.float64),
                                    np.asarray(self.var, np.float64) * count,
                                    np.asarray(self.min, np.float64),
                                    np.asarray(self.max, np.float64))

  def merge(self, other: Stats) -> Stats:
    """Statistics of two disjoint parts together (Chan's formulas); moments only.

    Quantiles cannot be merged from two medians: statistics that hold quantiles raise. Keep a
    :class:`jaxnorm.StatsAccumulator` per part (``jaxnorm.accumulate_stats``) and merge those.
    """
    for stats in (self, other):
      _refuse_quantiles(stats, "merge")
    if self.channels != other.channels or self.channel_axis != other.channel_axis:
      raise ValueError(
          f"cannot merge statistics of {self.channels} channels along channel_axis="
          f"{self.channel_axis} with {other.channels} channels along channel_axis="
          f"{other.channel_axis}; fit both parts with the same channels and channel_axis")
    merged = host_moments.merge(self.host_moments(), other.host_moments())
    return from_moments(merged, channel_axis=self.channel_axis,
                        ignore_nan=self.ignore_nan or other.ignore_nan)

  def update(self, batch: ArrayLike) -> Stats:
    """The statistics of the data seen so far and ``batch``; moments only (see :meth:`merge`)."""
    _refuse_quantiles(self, "update")
    x = host_moments.channels_last(np.asarray(batch), self.channel_axis)
    moments, _ = host_moments.batch_moments(x, ignore_nan=self.ignore_nan)
    if moments.count.shape != (self.channels,):
      raise ValueError(f"a batch of {x.shape[1]} channels cannot update statistics of "
                       f"{self.channels} channels")
    return from_moments(host_moments.merge(self.host_moments(), moments),
                        channel_axis=self.channel_axis, ignore_nan=self.ignore_nan)

  def save(self, path: Any) -> None:
    """Writes the statistics as JSON: the same as :func:`jaxnorm.save_stats`."""
    json_text.write(to_dict(self), path)

  @classmethod
  def load(cls, path: Any) -> Stats:
    """Reads statistics written by :meth:`save` (:func:`jaxnorm.load_stats` reads both
    statistics and accumulators)."""
    return from_dict(json_text.read(path), source=os.fspath(path))


def _refuse_quantiles(stats: Stats, what: str) -> None:
  if stats.has_quantiles:
    raise ValueError(
        f"cannot {what} Stats that hold quantiles: a median of medians is not the median, and "
        f"Stats keep no sketch. Keep the accumulator instead: acc = jaxnorm.accumulate_stats("
        f"batches) (or jaxnorm.StatsAccumulator(channel_axis).update(batch)), then acc.update("
        f"batch), acc.merge(other_acc) and acc.result(); save it with acc.save(path) to "
        f"continue later. For moments only, fit with quantiles=False")


def from_moments(moments: host_moments.HostMoments, *, channel_axis: int | None,
                 ignore_nan: bool, quantiles: dict[str, np.ndarray] | None = None) -> Stats:
  """``Stats`` from host moments and, optionally, ``median``, ``q25``, ``q75``,
  ``quantile_error``."""
  var = moments.m2 / np.maximum(moments.count, 1)
  return Stats(count=moments.count, mean=moments.mean, var=var, std=np.sqrt(var),
               min=moments.min, max=moments.max, **(quantiles or {}),
               channel_axis=channel_axis, ignore_nan=ignore_nan)


jax.tree_util.register_dataclass(Stats, data_fields=list(ARRAY_FIELDS),
                                 meta_fields=["channel_axis", "ignore_nan"])


# The JSON form of Stats: one object with the format, the version, the channels, channel_axis,
# ignore_nan and one list of ``channels`` numbers for each field of ARRAY_FIELDS (the last four
# may be null, all together, when no quantiles were fitted). Version 1 files (quantile_error as
# an absolute value bound, from the former histogram) are still read.
FORMAT = "jaxnorm.Stats"
VERSION = 2
KEYS = ("format", "version", "channels", "channel_axis", "ignore_nan") + ARRAY_FIELDS
# Counts are stored as float64 when merged and checked: integers above 2**53 are not exact.
MAX_COUNT = 2**53


def to_dict(stats: Stats) -> dict[str, Any]:
  """The JSON object for ``stats`` (plain Python lists of numbers), validated."""
  data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "channels": stats.channels,
                          "channel_axis": stats.channel_axis,
                          "ignore_nan": bool(stats.ignore_nan)}
  for name in ARRAY_FIELDS:
    value = getattr(stats, name)
    if value is None:
      data[name] = None
    elif name == "percentiles":
      data[name] = [[float(v) for v in row] for row in np.asarray(value, np.float64)]
    elif name == "count":
      count = np.asarray(value, np.float64)
      data[name] = [int(c) if np.isfinite(c) and c == int(c) else float(c) for c in count]
    else:
      data[name] = [float(v) for v in np.asarray(value, np.float64)]
  from_dict(data, source="the statistics to save")
  return data


def _fail(source: str, message: str):
  raise ValueError(f"{source}: {message}")


def check_header(data: Any, source: str, expected: str, versions: tuple[int, ...]) -> None:
  """Checks the ``format`` and ``version`` of a JSON object written by jaxnorm."""
  if not isinstance(data, dict):
    _fail(source, f"expected a JSON object written by jaxnorm.save_stats, got "
                  f"{type(data).__name__}")
  found = data.get("format")
  if found != expected:
    hint = ""
    if found in ("jaxnorm.Stats", "jaxnorm.StatsAccumulator"):
      hint = (" (read either kind with jaxnorm.load_stats, or an accumulator with "
              "jaxnorm.load_accumulator)")
    _fail(source, f"'format' is {found!r}, expected {expected!r}; this is not a file written "
                  f"by jaxnorm.save_stats{hint}")
  if data.get("version") not in versions:
    _fail(source, f"'version' is {data.get('version')!r}; this jaxnorm reads version(s) "
                  f"{list(versions)}")


def numbers(data: dict, name: str, channels: int, source: str, *,
            allow_null_items: bool = False) -> np.ndarray:
  """The list ``data[name]`` of ``channels`` finite numbers as float64 (null items as NaN)."""
  value = data[name]
  if not isinstance(value, list):
    _fail(source, f"'{name}' must be a list of {channels} numbers, got {type(value).__name__}")
  if len(value) != channels:
    _fail(source, f"'{name}' has {len(value)} values but 'channels' is {channels}; every "
                  f"statistic needs one value per channel")
  if not all((isinstance(v, (int, float)) and not isinstance(v, bool))
             or (allow_null_items and v is None) for v in value):
    _fail(source, f"'{name}' must hold only numbers, got {value!r}")
  try:
    array = np.asarray([np.nan if v is None else v for v in value], np.float64)
  except (OverflowError, ValueError, TypeError) as error:  # an integer beyond float64
    _fail(source, f"'{name}' holds a number that is not a float64 ({error}): {value!r}")
  if not np.all(np.isfinite(array) | (np.isnan(array) & allow_null_items)):
    _fail(source, f"'{name}' holds a non-finite value (NaN or infinity): {value!r}")
  return array


def check_counts(count: np.ndarray, source: str, *, allow_zero: bool) -> np.ndarray:
  if np.any(count != np.round(count)) or np.any(count < 0) or np.any(count > MAX_COUNT):
    _fail(source, f"'count' must hold integers from 0 to 2**53, got {count.tolist()[:8]}")
  if not allow_zero and np.any(count == 0):
    _fail(source, f"channel(s) {np.flatnonzero(count == 0).tolist()[:8]} hold no value "
                  f"(count 0); statistics need at least one value per channel")
  return count.astype(np.int64)


def check_layout(data: dict, source: str, keys: tuple[str, ...]) -> tuple[int, Any, bool]:
  """Checks the keys, ``channels``, ``channel_axis`` and ``ignore_nan``; returns them."""
  missing = [k for k in keys if k not in data and k != "ignore_nan"]
  if missing:
    _fail(source, f"missing key(s) {missing}; the file must hold every field written by "
                  f"jaxnorm.save_stats")
  unknown = sorted(str(k) for k in data if k not in keys)
  if unknown:
    _fail(source, f"unknown key(s) {unknown}; such a file holds only {list(keys)}")
  channels = data["channels"]
  if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
    _fail(source, f"'channels' must be a positive integer, got {channels!r}")
  channel_axis = data["channel_axis"]
  if channel_axis is not None and (not isinstance(channel_axis, int)
                                   or isinstance(channel_axis, bool)):
    _fail(source, f"'channel_axis' must be an integer or null, got {channel_axis!r}")
  if channel_axis is None and channels != 1:
    _fail(source, f"'channel_axis' is null (one channel over all values) but 'channels' is "
                  f"{channels}; statistics of several channels need the integer channel axis "
                  f"they were fitted with")
  ignore_nan = data.get("ignore_nan", False)
  if not isinstance(ignore_nan, bool):
    _fail(source, f"'ignore_nan' must be true or false, got {ignore_nan!r}")
  return channels, channel_axis, ignore_nan


def from_dict(data: Any, *, source: str = "stats") -> Stats:
  """Validates a JSON object and returns the :class:`Stats` it holds; ValueError if malformed."""
  check_header(data, source, FORMAT, (1, 2))
  if data["version"] == 1:  # written before percentiles existed
    data = {**data, "percentiles": data.get("percentiles")}
  channels, channel_axis, ignore_nan = check_layout(data, source, KEYS)
  count = check_counts(numbers(data, "count", channels, source), source, allow_zero=False)
  fields = {name: numbers(data, name, channels, source) for name in ARRAY_FIELDS[1:6]}
  fields["count"] = count
  expected = QUANTILE_FIELDS if data["version"] >= 2 else QUANTILE_FIELDS[:4]
  present = [name for name in expected if data[name] is not None]
  if present and len(present) != len(expected):
    _fail(source, f"{present} are given but {sorted(set(expected) - set(present))} are "
                  f"null; give all of median, q25, q75, quantile_error and percentiles, or none")
  fields.update({name: numbers(data, name, channels, source) for name in present
                 if name != "percentiles"})
  if "percentiles" in present:
    fields["percentiles"] = _percentiles(data["percentiles"], channels, source)
  if np.any(fields["var"] < 0):
    _fail(source, f"'var' must not be negative, got {data['var']!r}")
  if not np.allclose(fields["std"], np.sqrt(fields["var"]), rtol=1e-6, atol=0):
    _fail(source, "'std' is not the square root of 'var'; the file was edited or corrupted")
  lo, hi = fields["min"], fields["max"]
  order = [("min", "max"), ("min", "mean"), ("mean", "max")]
  if present:
    order += [("min", "q25"), ("q25", "median"), ("median", "q75"), ("q75", "max")]
    error = fields["quantile_error"]
    if np.any(error < 0) or (data["version"] >= 2 and np.any(error > 1)):
      _fail(source, "'quantile_error' (a normalized rank error) must lie in [0, 1]")
  slack = 1e-12 * np.maximum(np.abs(lo), np.abs(hi))
  for low_name, high_name in order:
    if np.any(fields[low_name] > fields[high_name] + slack):
      channel = int(np.argmax(fields[low_name] > fields[high_name] + slack))
      _fail(source, f"'{low_name}' exceeds '{high_name}' in channel {channel}; statistics must "
                    f"satisfy min <= q25 <= median <= q75 <= max and min <= mean <= max")
  if "percentiles" in present:
    percentiles = fields["percentiles"]
    if np.any(np.diff(percentiles, axis=1) < 0) or np.any(
        percentiles < lo[:, None] - slack[:, None]) or np.any(
            percentiles > hi[:, None] + slack[:, None]):
      _fail(source, "'percentiles' must rise from min to max in every channel")
  # Popoviciu: a variance is at most ((max - min) / 2)**2 (times n / (n - 1) if unbiased), so a
  # constant channel (min == max) has variance 0. The slack covers float64 rounding.
  magnitude = np.maximum(np.abs(lo), np.abs(hi))
  bound = np.square((hi - lo) / 2) * (count / np.maximum(count - 1, 1))
  too_wide = fields["var"] > bound * (1 + 1e-9) + np.square(1e-8 * magnitude)
  if np.any(too_wide):
    channel = int(np.argmax(too_wide))
    _fail(source, f"'var' is {float(fields['var'][channel])!r} in channel {channel}, more than "
                  f"((max - min) / 2)**2 * n / (n - 1) = {float(bound[channel])!r} allows for "
                  f"values in [{float(lo[channel])!r}, {float(hi[channel])!r}]; the file was "
                  f"edited or corrupted")
  return Stats(**fields, channel_axis=channel_axis, ignore_nan=ignore_nan)


def _percentiles(value: Any, channels: int, source: str) -> np.ndarray:
  rows = value if isinstance(value, list) else None
  if rows is None or len(rows) != channels or not all(
      isinstance(row, list) and len(row) == PERCENTS for row in rows):
    _fail(source, f"'percentiles' must be {channels} lists of {PERCENTS} numbers (0th to 100th)")
  return np.stack([numbers({"percentiles": row}, "percentiles", PERCENTS, source)
                   for row in rows])
