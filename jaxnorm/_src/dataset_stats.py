"""Exact per-channel statistics of a whole dataset: streaming, mergeable, across devices.

:func:`fit_stats` reads a dataset one batch at a time (any iterable of NumPy or JAX arrays, any
real dtype) and returns a :class:`Stats` with, per channel, the count, mean, variance, standard
deviation, minimum, maximum and the 25th, 50th and 75th percentiles.

Moments are exact. Each batch is reduced on the host in float64 with the two-pass formula, and
batches are merged with Chan's parallel formulas (Chan, Golub and LeVeque, "Updating formulae and
a pairwise algorithm for computing sample variances", 1979):

.. math::

   n = n_a + n_b, \\quad \\delta = \\mu_b - \\mu_a, \\quad
   \\mu = \\mu_a + \\delta \\frac{n_b}{n}, \\quad
   M_2 = M_{2,a} + M_{2,b} + \\delta^2 \\frac{n_a n_b}{n},

so for well-conditioned data (std / |mean| above about 1e-7) the result equals NumPy's float64
statistics of the concatenated data to about 1e-12 relative, whatever the offset of the data, the
batch sizes or the order of the merges. For data whose spread is far below its offset (std /
|mean| below about 1e-7) the relative error grows with |mean| / std, as in any float64
computation. uint8, int8 and bool
batches are reduced through a histogram of their values, which is exact and one pass.

Quantiles come from a mergeable histogram of ``bins`` bins per channel on a grid of power-of-two
width :math:`w = 2^e` whose edges are multiples of :math:`w`. The grid grows by doubling
:math:`w` (merging pairs of bins) only when the data's range needs it, so any two histograms
merge exactly, and :math:`w` is the smallest power of two for which ``bins`` bins cover
``[min, max]``:

.. math:: w \\le \\frac{2\\,(\\max - \\min)}{\\mathrm{bins} - 1}.

Each quantile (NumPy's default, linear interpolation between order statistics) is then within
:math:`\\min(w, \\max - \\min)` of the exact one; ``Stats.quantile_error`` holds that bound per
channel. Integer data (uint8 images) keep :math:`w = 1` while their range fits in ``bins``: their
quantiles are exact and ``quantile_error`` is 0. For float data the error is usually far below
the bound (the position inside a bin is interpolated): about 5e-5 of the interquartile range for
a million normal values with the default 4096 bins, against a bound of about 3e-3. Values that
all lie on the grid (a few distinct round values, float32 data far from zero) give exact
quantiles too: ``quantile_error`` says so with a 0.

Across devices, :func:`device_stats` reduces each device's shard with
:func:`jaxnorm.reduce_moments`'s per-device moments and merges count, mean, variance, minimum and
maximum with one ``all_gather``; across processes, :func:`merge_across_processes` gathers every
process's complete host statistics (histograms included) in one collective.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import collectives

DEFAULT_BINS = 4096
_SMALL_INTEGER_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.bool_))
# Bin indices stay below 2**51 in magnitude, so they are exact in float64.
_INDEX_BITS = 51
# Grain (see Histogram) of data whose values are not known to lie on a power-of-two grid; an
# empty batch's grain is larger than any, so merging with it keeps the other's.
UNKNOWN_GRAIN = -(2**62)
_EMPTY_GRAIN = 2**62
# Bin width exponent of an empty histogram: finer than any float64, so merging keeps the other's.
_EMPTY_EXPONENT = -1100


class Histogram(NamedTuple):
  """Per-channel counts on a power-of-two grid, mergeable exactly.

  Bin ``j`` of channel ``c`` counts the values in
  ``[(start[c] + j) * 2**exponent[c], (start[c] + j + 1) * 2**exponent[c])``.

  Attributes:
    exponent: ``(C,)`` int64, the bin width is ``2**exponent``.
    start: ``(C,)`` int64, the grid index of the first bin.
    counts: ``(C, bins)`` int64.
    grain: ``(C,)`` int64, every value seen is a multiple of ``2**grain`` (``UNKNOWN_GRAIN`` if
      not known). Where ``grain >= exponent`` a bin holds one distinct value: exact quantiles.
  """
  exponent: np.ndarray
  start: np.ndarray
  counts: np.ndarray
  grain: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Stats:
  """Per-channel statistics of a dataset (biased variance, NumPy's linear quantiles).

  Every field has shape ``(C,)``, one value per channel. ``median``, ``q25``, ``q75`` and
  ``quantile_error`` are None when fitted with ``quantiles=False`` or by :func:`device_stats`.
  ``histogram`` (host-side, not saved to JSON) lets fitted statistics be updated and merged,
  quantiles included. It is not a pytree leaf: ``jax.jit``, ``jax.device_put`` and
  ``jax.tree.map`` keep the per-channel fields and give ``histogram=None`` (close over fitted
  statistics, rather than passing them as a jitted argument, where the histogram is needed).

  Attributes:
    count: number of values per channel (NaNs excluded with ``ignore_nan=True``).
    mean, var, std: mean, biased variance and its square root.
    min, max: extremes.
    median, q25, q75: the 50th, 25th and 75th percentiles.
    quantile_error: a bound on the absolute error of each quantile (0 where exact).
    channel_axis: the axis of the input holding the channels (None: one channel for all).
    ignore_nan: whether NaNs were skipped.

  Example:
    >>> import numpy as np, jaxnorm
    >>> stats = jaxnorm.fit_stats(np.array([[0, 10], [255, 30]], np.uint8))
    >>> stats.count, stats.mean, stats.median
    (array([2, 2]), array([127.5,  20. ]), array([127.5,  20. ]))
    >>> stats.update(np.array([[1, 20]], np.uint8)).median
    array([ 1., 20.])
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
  histogram: Histogram | None = dataclasses.field(default=None, repr=False)
  channel_axis: int | None = -1
  ignore_nan: bool = False

  @property
  def channels(self) -> int:
    """The number of channels."""
    return int(np.shape(self.mean)[0])

  def update(self, batch: ArrayLike) -> Stats:
    """Returns the statistics of the data seen so far and ``batch`` (like ``partial_fit``)."""
    x = channels_last(np.asarray(batch), self.channel_axis)
    partial = _add_batch(_partial_of(self), x, ignore_nan=self.ignore_nan,
                         bins=None if self.histogram is None else self._bins())
    return _finish(partial, self.channel_axis, self.ignore_nan)

  def merge(self, other: Stats) -> Stats:
    """Statistics of the data of ``self`` and ``other`` together (Chan's parallel formulas)."""
    return merge_stats(self, other)

  def quantile(self, q: ArrayLike) -> np.ndarray:
    """The ``q`` quantiles (``q`` in [0, 1]) per channel from the histogram, ``q.shape + (C,)``.

    Within ``quantile_error`` of NumPy's ``np.quantile(data, q, axis=0)`` (linear method).
    """
    if self.histogram is None:
      raise ValueError(
          "these Stats hold no histogram (loaded from JSON, computed by device_stats, fitted "
          "with quantiles=False, or passed through jax.jit, jax.device_put or another "
          "transformation, which keep the per-channel numbers but not the host-side histogram), "
          "so only the stored median, q25 and q75 are known; fit with "
          "jaxnorm.fit_stats(..., quantiles=True) and close over the statistics instead of "
          "passing them to a jitted function, e.g. "
          "jax.jit(lambda x: jaxnorm.robust(x, stats, quantile_range=(10, 90)))")
    q = np.asarray(q, np.float64)
    if np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
      raise ValueError(f"quantiles q={q} must lie in [0, 1]; for percentiles divide by 100")
    values = [_histogram_quantile(self.histogram, np.asarray(self.count), self.min, self.max, p)
              for p in q.ravel()]
    return np.stack(values).reshape(q.shape + (self.channels,))

  def save(self, path: Any) -> None:
    """Writes the statistics as human-readable JSON (see :func:`jaxnorm.save_stats`)."""
    from jaxnorm._src import stats_io
    stats_io.save_stats(self, path)

  @classmethod
  def load(cls, path: Any) -> Stats:
    """Reads and validates statistics written by :meth:`save` (see :func:`jaxnorm.load_stats`)."""
    from jaxnorm._src import stats_io
    return stats_io.load_stats(path)

  def _bins(self) -> int:
    return int(self.histogram.counts.shape[1])


# The per-channel numbers are the pytree's leaves; the histogram is not. It is host-side data
# (int64 counts, and grain markers such as UNKNOWN_GRAIN that need 64 bits): as leaves it would
# be copied to the device on every jitted call and, without jax_enable_x64, truncated to int32,
# which corrupts the quantiles and merges. So a Stats rebuilt from its leaves (by jax.jit,
# jax.device_put, jax.tree.map) has histogram=None: its quantile() says so, and update() and
# merge() give exact moments without quantiles.
_LEAVES = ("count", "mean", "var", "std", "min", "max", "median", "q25", "q75", "quantile_error")


def _flatten_stats(stats: Stats):
  children = [(jax.tree_util.GetAttrKey(name), getattr(stats, name)) for name in _LEAVES]
  return children, (stats.channel_axis, stats.ignore_nan)


def _unflatten_stats(aux, children) -> Stats:
  channel_axis, ignore_nan = aux
  return Stats(*children, histogram=None, channel_axis=channel_axis, ignore_nan=ignore_nan)


jax.tree_util.register_pytree_with_keys(
    Stats, _flatten_stats, _unflatten_stats,
    flatten_func=lambda stats: ([getattr(stats, name) for name in _LEAVES],
                                (stats.channel_axis, stats.ignore_nan)))


def channels_last(x: ArrayLike, channel_axis: int | None) -> np.ndarray | Array:
  """``x`` as a ``(values, channels)`` matrix (a view where the channels are already last)."""
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if channel_axis is None:
    return x.reshape(-1, 1)
  if x.ndim == 0:
    raise ValueError(
        f"a batch of shape {x.shape} has no channel axis {channel_axis}; give arrays of shape "
        f"(N, ..., C), or channel_axis=None for one channel over all values")
  (axis,) = checks.canonical_axes(channel_axis, x.ndim, name="channel_axis", shape=x.shape)
  if axis != x.ndim - 1:
    x = xp.moveaxis(x, axis, -1)
  return x.reshape(-1, x.shape[-1])


def _check_values(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, ignore_nan: bool) -> None:
  """Raises on infinities, and on NaNs unless they are ignored (min and max reveal both)."""
  if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
    return
  has_nan = np.isnan(lo) | np.isnan(hi)
  if np.any(has_nan) and not ignore_nan:
    raise ValueError(
        f"a batch holds NaN in channel(s) {np.flatnonzero(has_nan).tolist()[:8]}; pass "
        f"ignore_nan=True to skip NaNs, or clean the data first")
  infinite = np.isinf(lo) | np.isinf(hi)
  if np.any(has_nan):  # a NaN hides infinities from min and max
    infinite = np.any(np.isinf(x), axis=0)
  if np.any(infinite):
    raise ValueError(
        f"a batch holds an infinite value in channel(s) {np.flatnonzero(infinite).tolist()[:8]}; "
        f"replace or drop infinities before fitting statistics")


class _Partial(NamedTuple):
  """Running statistics: count, mean, sum of squared deviations, extremes, histogram."""
  count: np.ndarray
  mean: np.ndarray
  m2: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  histogram: Histogram | None


def _empty_partial(channels: int, bins: int | None) -> _Partial:
  histogram = None
  if bins is not None:
    histogram = Histogram(np.full(channels, _EMPTY_EXPONENT, np.int64),
                          np.zeros(channels, np.int64), np.zeros((channels, bins), np.int64),
                          np.full(channels, _EMPTY_GRAIN, np.int64))
  zeros = np.zeros(channels, np.float64)
  return _Partial(np.zeros(channels, np.int64), zeros, zeros.copy(), np.full(channels, np.inf),
                  np.full(channels, -np.inf), histogram)


def _partial_of(stats: Stats) -> _Partial:
  count = np.asarray(stats.count, np.float64).astype(np.int64)
  return _Partial(count, np.asarray(stats.mean, np.float64),
                  np.asarray(stats.var, np.float64) * count, np.asarray(stats.min, np.float64),
                  np.asarray(stats.max, np.float64), stats.histogram)


def _merge_moments(a: _Partial, count, mean, m2):
  """Chan's parallel formulas: the count, mean and m2 of two parts together."""
  total = a.count + count
  safe = np.maximum(total, 1)
  delta = mean - a.mean
  return (total, a.mean + delta * (count / safe),
          a.m2 + m2 + np.square(delta) * (a.count * (count / safe)))


def _value_histogram_moments(x: np.ndarray):
  """Exact moments and value counts of a uint8, int8 or bool matrix (one pass, a bincount)."""
  channels = x.shape[1]
  first = -128 if x.dtype == np.int8 else 0
  size = 256 if x.dtype != np.bool_ else 2
  index = x.astype(np.intp)
  if first:
    index -= first
  index += np.arange(channels, dtype=np.intp) * size
  counts = np.bincount(index.ravel(), minlength=channels * size).reshape(channels, size)
  values = np.arange(first, first + size, dtype=np.float64)
  count = counts.sum(1)
  safe = np.maximum(count, 1)
  mean = counts @ values / safe
  m2 = np.einsum("cv,cv->c", counts, np.square(values[None, :] - mean[:, None]))
  seen = counts > 0
  lo = np.where(count > 0, values[np.argmax(seen, 1)], np.inf)
  hi = np.where(count > 0, values[size - 1 - np.argmax(seen[:, ::-1], 1)], -np.inf)
  value_grid = Histogram(np.zeros(channels, np.int64), np.full(channels, first, np.int64),
                         counts.astype(np.int64), np.zeros(channels, np.int64))
  return count.astype(np.int64), mean, m2, lo, hi, value_grid


def _grid_for(lo: np.ndarray, hi: np.ndarray, bins: int, grain: np.ndarray,
              current: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """The grid ``(exponent, start)`` of ``bins`` bins for values in ``[lo, hi]``.

  The width ``2**exponent`` is the smallest power of two (and no finer than the ``current``
  grid's) whose bins cover ``[lo, hi]``, no finer than ``2**grain`` (bins that fine would stay
  empty) nor than the data's magnitude allows with exact float64 bin indices. The window keeps
  the ``current`` start where it still covers the values, and is centred on them otherwise, so
  that a running histogram is moved only now and then.
  """
  empty = ~(lo <= hi)
  lo = np.where(empty, 0.0, lo)
  hi = np.where(empty, 0.0, hi)
  spread = hi - lo
  with np.errstate(divide="ignore"):
    guess = np.ceil(np.log2(np.where(spread > 0, spread / (bins - 1), 1.0)))
    magnitude = np.log2(np.maximum(np.maximum(np.abs(lo), np.abs(hi)), np.finfo(float).tiny))
  floor = np.ceil(magnitude) - _INDEX_BITS
  floor = np.maximum(floor, grain)
  exp = np.maximum(np.where(spread > 0, guess - 1, floor), floor).astype(np.int64)
  if current is not None:
    exp = np.maximum(exp, current[0])
  while True:
    first = np.floor(np.ldexp(lo, -exp))
    last = np.floor(np.ldexp(hi, -exp))
    too_wide = last - first > bins - 1
    if not np.any(too_wide):
      break
    exp = exp + too_wide
  start = (first - (bins - 1 - (last - first)) // 2).astype(np.int64)
  if current is not None:
    keep = (exp == current[0]) & (first >= current[1]) & (last < current[1] + bins)
    start = np.where(keep, current[1], start)
  return exp, start


def _rebin(histogram: Histogram, exponent: np.ndarray, start: np.ndarray, bins: int) -> Histogram:
  """The same counts on a coarser (or equal) aligned grid of ``bins`` bins.

  Only the channels whose grid changes are moved; the others keep their counts.
  """
  old_bins = histogram.counts.shape[1]
  if old_bins == bins:
    changed = np.flatnonzero((exponent != histogram.exponent) | (start != histogram.start))
    if not len(changed):
      return histogram
    counts = histogram.counts.copy()
  else:
    changed = np.arange(len(exponent))
    counts = np.zeros((len(exponent), bins), np.int64)
  moved = histogram.counts[changed]
  keep = moved > 0
  if keep.any():
    shift = exponent[changed] - histogram.exponent[changed]
    index = (histogram.start[changed, None] + np.arange(old_bins)) >> shift[:, None]
    index = index - start[changed, None]
    if np.any((index[keep] < 0) | (index[keep] >= bins)):
      raise AssertionError("histogram grid does not cover the data")  # unreachable by design
    flat = (index + np.arange(len(changed))[:, None] * bins)[keep]
    moved = np.bincount(flat, weights=moved[keep], minlength=len(changed) * bins)
    counts[changed] = moved.reshape(len(changed), bins).astype(np.int64)
  else:
    counts[changed] = 0
  return Histogram(exponent, start, counts, histogram.grain)


def _bin(x: np.ndarray, xf: np.ndarray, valid: np.ndarray | None, exponent: np.ndarray,
         start: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
  """Counts of a batch on the grid ``(exponent, start)``, and the grain of its values.

  Where every value of a channel is a bin edge ``k * 2**exponent``, the grain is ``exponent``
  plus the trailing zero bits common to every ``k`` (those of their bitwise OR). Scaling by a
  power of two and flooring are exact, in float32 for float32 data where the factor fits.
  """
  channels = x.shape[1]
  work = xf
  if x.dtype == np.float32 and np.all((exponent <= 0) & (exponent >= -126)):
    work = x
  factor = np.ldexp(1.0, np.clip(-exponent, -1074, 1023))  # clipped only for empty channels
  scaled = work * factor.astype(work.dtype)
  index = np.floor(scaled)
  on_edges = index == scaled
  del scaled
  if valid is not None:
    on_edges |= ~valid
    index[~valid] = 0
  index = index.astype(np.int64)
  common = np.bitwise_or.reduce(index, axis=0)
  lowest_bit = np.frexp((common & -common).astype(np.float64))[1] - 1
  grain = np.where(common == 0, _EMPTY_GRAIN, exponent + lowest_bit)
  grain = np.where(np.all(on_edges, axis=0), grain, UNKNOWN_GRAIN)
  index -= start[None, :] - np.arange(channels, dtype=np.int64)[None, :] * bins
  if valid is not None:
    index = index[valid]
  counts = np.bincount(index.ravel(), minlength=channels * bins)
  return counts.reshape(channels, bins).astype(np.int64, copy=False), grain


def _known_grain(dtype: np.dtype, channels: int) -> np.ndarray:
  """Integers are multiples of 2**0; for floats nothing is known before looking."""
  return np.full(channels, 0 if dtype.kind in "biu" else UNKNOWN_GRAIN, np.int64)


def _grid_floor(*grains: np.ndarray) -> np.ndarray:
  grain = functools.reduce(np.minimum, grains)
  return np.where(grain == _EMPTY_GRAIN, UNKNOWN_GRAIN, grain)


def _add_batch(acc: _Partial | None, x: np.ndarray, *, ignore_nan: bool,
               bins: int | None) -> _Partial:
  """The running statistics with one more batch ``x`` of shape (values, channels).

  The batch is binned directly on the running grid, widened first where its values need it.
  """
  if x.dtype.kind not in "biuf":
    raise TypeError(f"fit_stats expects real numbers, got a batch of dtype {x.dtype}")
  channels = x.shape[1]
  if acc is None:
    acc = _empty_partial(channels, bins)
  elif acc.count.shape[0] != channels:
    raise ValueError(
        f"cannot merge statistics of {acc.count.shape[0]} and {channels} channels; every batch "
        f"must have the same number of channels along channel_axis")
  if x.shape[0] == 0:
    return acc
  value_counts = xf = valid = None
  if x.dtype in _SMALL_INTEGER_DTYPES:
    count, mean, m2, lo, hi, value_counts = _value_histogram_moments(x)
  else:
    with np.errstate(invalid="ignore"):
      lo = np.min(x, axis=0).astype(np.float64)
      hi = np.max(x, axis=0).astype(np.float64)
    _check_values(x, lo, hi, ignore_nan)
    xf = x.astype(np.float64)
    if np.any(np.isnan(lo)):  # only with ignore_nan: NaNs are skipped
      valid = ~np.isnan(xf)
      lo = np.min(np.where(valid, xf, np.inf), axis=0)
      hi = np.max(np.where(valid, xf, -np.inf), axis=0)
  lo, hi = np.minimum(acc.lo, lo), np.maximum(acc.hi, hi)
  histogram = None
  if acc.histogram is not None:
    running = acc.histogram
    exponent, start = _grid_for(lo, hi, running.counts.shape[1],
                                _grid_floor(running.grain, _known_grain(x.dtype, channels)),
                                (running.exponent, running.start))
    running = _rebin(running, exponent, start, running.counts.shape[1])
    if value_counts is not None:
      batch = _rebin(value_counts, exponent, start, running.counts.shape[1])
      counts, grain = batch.counts.copy(), batch.grain
    else:
      counts, grain = _bin(x, xf, valid, exponent, start, running.counts.shape[1])
    counts += running.counts  # counts is this batch's own array
    histogram = Histogram(exponent, start, counts, np.minimum(running.grain, grain))
  if xf is not None:
    if valid is None:
      count = np.full(channels, x.shape[0], np.int64)
      mean = np.sum(xf, axis=0) / x.shape[0]
      xf -= mean
    else:
      count = valid.sum(0).astype(np.int64)
      xf[~valid] = 0
      mean = np.sum(xf, axis=0) / np.maximum(count, 1)
      xf -= mean
      xf[~valid] = 0
    np.square(xf, out=xf)
    m2 = np.sum(xf, axis=0)
  return _Partial(*_merge_moments(acc, count, mean, m2), lo, hi, histogram)


def stats_of_batch(batch: ArrayLike, *, channel_axis: int | None = -1, ignore_nan: bool = False,
                   bins: int | None = DEFAULT_BINS) -> Stats:
  """Exact statistics of one batch (float64 on the host); ``bins=None`` skips the quantiles."""
  x = channels_last(np.asarray(batch), channel_axis)
  return _finish(_add_batch(None, x, ignore_nan=ignore_nan, bins=bins), channel_axis, ignore_nan)


def _finish(partial: _Partial, channel_axis, ignore_nan) -> Stats:
  """Stats from count, mean and the sum of squared deviations; quantiles from the histogram."""
  count, mean, m2, lo, hi, histogram = partial
  var = m2 / np.maximum(count, 1)
  quantile_values = [None, None, None]
  error = None
  if histogram is not None:
    quantile_values = [_histogram_quantile(histogram, count, lo, hi, q) for q in (0.5, 0.25, 0.75)]
    width = np.ldexp(1.0, histogram.exponent)
    exact = (histogram.grain >= histogram.exponent) | (lo == hi)
    error = np.where(exact, 0.0, np.minimum(width, np.where(count > 0, hi - lo, np.nan)))
  median, q25, q75 = quantile_values
  return Stats(count=count, mean=mean, var=var, std=np.sqrt(var), min=lo, max=hi, median=median,
               q25=q25, q75=q75, quantile_error=error, histogram=histogram,
               channel_axis=channel_axis, ignore_nan=ignore_nan)


def _histogram_quantile(histogram: Histogram, count, lo, hi, q: float) -> np.ndarray:
  """NumPy's linear quantile, with each order statistic placed inside its bin."""
  count = np.asarray(count)
  cumulative = np.cumsum(histogram.counts, axis=1)
  rank = (np.maximum(count, 1) - 1) * q
  below = np.floor(rank)
  above = np.minimum(below + 1, np.maximum(count - 1, 0))
  width = np.ldexp(1.0, histogram.exponent)
  exact = histogram.grain >= histogram.exponent

  def order_statistic(k):
    j = np.minimum(np.sum(cumulative <= k[:, None], axis=1), histogram.counts.shape[1] - 1)
    in_bin = np.take_along_axis(histogram.counts, j[:, None], 1)[:, 0]
    before = np.take_along_axis(cumulative, j[:, None], 1)[:, 0] - in_bin
    left = (histogram.start + j) * width
    inside = (k - before + 0.5) / np.maximum(in_bin, 1)
    value = np.where(exact, left, left + inside * width)
    return np.clip(value, lo, hi)

  with np.errstate(invalid="ignore"):  # channels without values give NaN
    low = order_statistic(below)
    value = low + (rank - below) * (order_statistic(above) - low)
  return np.where(count > 0, value, np.nan)


def merge_stats(a: Stats, b: Stats) -> Stats:
  """Statistics of two disjoint parts of a dataset together (Chan's parallel formulas).

  Quantiles need both histograms: where one is missing (Stats loaded from JSON, fitted with
  ``quantiles=False``, or passed through ``jax.jit`` or ``jax.device_put``) the merged median,
  q25 and q75 are None.
  """
  if a.channels != b.channels:
    raise ValueError(
        f"cannot merge statistics of {a.channels} and {b.channels} channels; every batch must "
        f"have the same number of channels along channel_axis")
  if a.channel_axis != b.channel_axis:
    raise ValueError(
        f"cannot merge statistics fitted with channel_axis={a.channel_axis} and "
        f"channel_axis={b.channel_axis}; fit both with the same channel_axis")
  pa, pb = _partial_of(a), _partial_of(b)
  lo, hi = np.minimum(pa.lo, pb.lo), np.maximum(pa.hi, pb.hi)
  histogram = None
  if pa.histogram is not None and pb.histogram is not None:
    bins = a._bins()
    if b._bins() != bins:
      raise ValueError(f"cannot merge histograms of {bins} and {b._bins()} bins; fit with the "
                       f"same bins")
    ha, hb = pa.histogram, pb.histogram
    larger = ha if np.sum(pa.count) >= np.sum(pb.count) else hb  # move the smaller one
    exponent, start = _grid_for(lo, hi, bins, _grid_floor(ha.grain, hb.grain),
                                (np.maximum(ha.exponent, hb.exponent), larger.start))
    ha, hb = _rebin(ha, exponent, start, bins), _rebin(hb, exponent, start, bins)
    histogram = Histogram(exponent, start, ha.counts + hb.counts,
                          np.minimum(ha.grain, hb.grain))
  merged = _Partial(*_merge_moments(pa, pb.count, pb.mean, pb.m2), lo, hi, histogram)
  return _finish(merged, a.channel_axis, a.ignore_nan or b.ignore_nan)


def fit_stats(batches: Iterable[ArrayLike] | ArrayLike, *, channel_axis: int | None = -1,
              ignore_nan: bool = False, quantiles: bool = True, bins: int = DEFAULT_BINS,
              progress: bool = False, total: int | None = None) -> Stats:
  """Exact per-channel statistics of a dataset given as batches, streamed one batch at a time.

  .. math::

     \\mu_c = \\frac{1}{n}\\sum_i x_{i,c}, \\qquad
     \\sigma_c^2 = \\frac{1}{n}\\sum_i (x_{i,c} - \\mu_c)^2

  over every value of channel :math:`c` in every batch, merged with Chan's parallel formulas in
  float64: equal to NumPy's float64 statistics of the concatenated data. Quantiles from a
  mergeable histogram, within ``Stats.quantile_error`` (at most
  :math:`2(\\max-\\min)/(\\mathrm{bins}-1)`, 0 for integer data such as uint8 images).

  Args:
    batches: an iterable of arrays (NumPy or JAX, any real dtype), or a single array. Each has
      the channels along ``channel_axis``; the other axes (and their sizes) may vary.
    channel_axis: the channel axis, e.g. -1 for (N, F) tables and (N, H, W, C) images, 1 for
      (N, C, H, W); None for one channel over all values.
    ignore_nan: skip NaNs (like ``np.nanmean``); otherwise a NaN raises a ValueError.
    quantiles: compute median, q25 and q75 (a histogram of ``bins`` bins per channel).
    bins: histogram bins per channel; the quantile error bound shrinks as 1 / bins.
    progress: show a tqdm progress bar, with a total where ``len(batches)`` or ``total`` is known.
    total: the number of batches, for the progress bar.

  Returns:
    A :class:`Stats`; ``Stats.update(batch)`` adds more data, ``Stats.merge`` joins two parts.

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
  if isinstance(batches, (np.ndarray, jax.Array)):
    batches = [batches]
  if bins < 2:
    raise ValueError(f"bins={bins} must be at least 2; the default is {DEFAULT_BINS}")
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  iterator = iter(batches)
  if progress:
    from tqdm.auto import tqdm
    iterator = tqdm(iterator, total=total, unit="batch", desc="fit_stats")
  partial = None
  rows = 0
  try:
    for number, batch in enumerate(iterator):
      try:
        x = channels_last(np.asarray(batch), channel_axis)
        partial = _add_batch(partial, x, ignore_nan=ignore_nan, bins=bins if quantiles else None)
        rows += x.shape[0]
      except ValueError as error:
        raise ValueError(f"batch {number} of shape {np.shape(batch)}: {error}") from None
  finally:
    if progress:
      iterator.close()  # ends the bar's line, also when a batch fails
  if partial is None:
    raise ValueError("fit_stats got no batch; give an iterable of arrays, or one array")
  result = _finish(partial, channel_axis, ignore_nan)
  if not rows:
    raise ValueError(
        f"fit_stats got only empty batches (no rows, e.g. shape (0, {result.channels})); give "
        f"batches with at least one row")
  empty = np.flatnonzero(result.count == 0).tolist()
  if empty:
    raise ValueError(
        f"channel(s) {empty[:8]} hold no value (every value is NaN); drop those channels or "
        f"fill the NaNs before fitting")
  return result


def device_stats(x: ArrayLike, *, channel_axis: int | None = -1, ignore_nan: bool = False,
                 axis_name: Hashable | None = None) -> Stats:
  """Count, mean, variance, std, min and max per channel of ``x``, over devices with one collective.

  ``x`` keeps its layout: the moments are :func:`jaxnorm.reduce_moments` over every axis but
  the channel axis (shifted, in float32 or wider), and min and max are reduced over the same
  axes. Without ``axis_name``, input sharded over an Explicit mesh (``jax.make_mesh``'s default)
  is reduced shard by shard and pooled with one ``all_gather``, and under sharded ``jit`` over
  an Auto mesh XLA partitions the reductions. With ``axis_name`` (under ``vmap``, ``pmap``,
  ``shard_map``) one ``all_gather`` brings every device's count, mean, variance, minimum and
  maximum to all of them, and they are merged with Chan's formulas weighted by count
  (``stats.merge_moments``, the merge of ``stats.pool_moments``). The result is that of all
  shards together. Jittable; quantiles are left None (use :func:`fit_stats` on the host, and
  :func:`merge_across_processes` across processes).

  Args:
    x: this device's values (or the whole array, sharded or not), channels along
      ``channel_axis``.
    channel_axis: the channel axis; None for one channel over all values.
    ignore_nan: skip NaNs. Unlike :func:`fit_stats`, which raises on a NaN, ``device_stats``
      cannot raise on data (it runs under ``jit``): with ``ignore_nan=False`` a NaN in a channel
      silently makes that channel's mean, var, std, min and max NaN. Check the result (e.g.
      ``jnp.isnan(stats.mean).any()``), or pass ``ignore_nan=True``.
    axis_name: the mapped axis to merge over (under ``vmap``, ``pmap``, ``shard_map``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> shards = jnp.arange(8.0).reshape(2, 4, 1)  # two devices, four values each
    >>> stats = jax.vmap(lambda x: jaxnorm.device_stats(x, axis_name="d"), axis_name="d")(shards)
    >>> stats.mean[0], stats.var[0], stats.max[0]
    (Array([3.5], dtype=float32), Array([5.25], dtype=float32), Array([7.], dtype=float32))
  """
  x = jnp.asarray(x)
  if channel_axis is None:
    x = x.reshape(1) if x.ndim == 0 else x
    axes = tuple(range(x.ndim))
  else:
    if x.ndim == 0:
      raise ValueError(
          f"an array of shape {x.shape} has no channel axis {channel_axis}; give arrays of "
          f"shape (N, ..., C), or channel_axis=None for one channel over all values")
    (channel,) = checks.canonical_axes(channel_axis, x.ndim, name="channel_axis", shape=x.shape)
    axes = tuple(a for a in range(x.ndim) if a != channel)
  # No reshape to (values, channels): x keeps its layout, so input sharded over an Explicit
  # mesh is reduced shard by shard (reduce_moments pools the shards with one all_gather).
  xf = x.astype(checks.reduction_dtype(x.dtype))
  valid = ~jnp.isnan(xf) if ignore_nan else None
  if axis_name is None:
    moments = moments_lib.reduce_moments(xf, axes, where=valid)
  else:
    moments = moments_lib.local_moments(xf, axes, valid)
  low_values = xf if valid is None else jnp.where(valid, xf, jnp.inf)
  high_values = xf if valid is None else jnp.where(valid, xf, -jnp.inf)
  lo = jnp.min(low_values, axis=axes, keepdims=True, initial=jnp.inf)
  hi = jnp.max(high_values, axis=axes, keepdims=True, initial=-jnp.inf)
  if axis_name is not None:
    moments, lo, hi = _pool(moments, lo, hi, axis_name)

  def per_channel(a: Array) -> Array:
    a = jnp.broadcast_to(a, lo.shape) if a.shape != lo.shape else a
    a = jnp.squeeze(a, axis=axes)
    return a.reshape(1) if channel_axis is None else a

  var = per_channel(moments.var)
  return Stats(count=per_channel(moments.count), mean=per_channel(moments.mean), var=var,
               std=jnp.sqrt(var), min=per_channel(lo), max=per_channel(hi),
               channel_axis=channel_axis, ignore_nan=ignore_nan)


def _pool(local: moments_lib.Moments, lo: Array, hi: Array, axis_name: Hashable):
  """One all_gather of every device's moments, minimum and maximum, then the count-weighted merge.

  The merge is that of :func:`collectives.pool_moments` (:func:`collectives.merge_moments`).
  """
  packed = jnp.stack(list(local) + [lo, hi])
  gathered = collectives.gather(packed, axis_name)
  merged = collectives.merge_moments(moments_lib.Moments(*(gathered[:, i] for i in range(4))))
  return merged, jnp.min(gathered[:, 4], axis=0), jnp.max(gathered[:, 5], axis=0)


_FIELDS = ("count", "mean", "var", "min", "max")


def _pack(stats: Stats) -> np.ndarray:
  """Every host statistic (histogram included) in one uint32 buffer, exact (float64 bits)."""
  rows = [np.asarray(getattr(stats, name), np.float64) for name in _FIELDS]
  histogram = stats.histogram
  if histogram is not None:
    rows += [histogram.exponent.astype(np.float64), histogram.start.astype(np.float64),
             histogram.grain.astype(np.float64)]
    rows += list(histogram.counts.astype(np.float64).T)
  return np.ascontiguousarray(np.stack(rows)).view(np.uint32)


def _unpack(buffer: np.ndarray, like: Stats) -> Stats:
  rows = np.ascontiguousarray(buffer).view(np.float64)
  count, mean, var, lo, hi = rows[:5]
  histogram = None
  if like.histogram is not None:
    exponent, start, grain = rows[5:8]
    histogram = Histogram(exponent.astype(np.int64), start.astype(np.int64),
                          np.ascontiguousarray(rows[8:].T).astype(np.int64),
                          grain.astype(np.int64))
  return _finish(_Partial(count.astype(np.int64), mean, var * count, lo, hi, histogram),
                 like.channel_axis, like.ignore_nan)


def merge_across_processes(stats: Stats, *,
                           gather: Callable[[np.ndarray], np.ndarray] | None = None) -> Stats:
  """Merges every process's statistics of its part of the data, with one collective.

  For multi-process JAX (after ``jax.distributed.initialize()``): each process fits the
  statistics of its own files with :func:`fit_stats`, then this gathers all of them (histograms
  included, bit-exact) with ``jax.experimental.multihost_utils.process_allgather`` and merges
  them in process order. Every process gets the statistics of all the data. With one process it
  returns the same statistics.

  Args:
    stats: this process's statistics from :func:`fit_stats`.
    gather: the all-gather to use (default ``process_allgather``); it maps a buffer to a stack
      of every process's buffer.
  """
  if gather is None:
    from jax.experimental import multihost_utils
    gather = functools.partial(multihost_utils.process_allgather, tiled=False)
  buffers = np.asarray(gather(_pack(stats)))
  result = None
  for buffer in buffers:
    part = _unpack(buffer, stats)
    result = part if result is None else merge_stats(result, part)
  return result
