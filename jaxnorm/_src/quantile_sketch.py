"""Per-channel quantiles: exact value counts for 8-bit data, KLL sketches for everything else.

Float and wide integer data go into one Apache DataSketches KLL sketch of doubles per channel
(Karnin, Lang and Liberty, "Optimal quantile approximation in streams", 2016). With
``k = 2900`` its a-priori normalized rank error is at most

.. math:: \\varepsilon = 9.9 \\times 10^{-4}

with 99% confidence, whatever the data (outliers, heavy tails, any offset or range), for every
quantile and after any number of merges in any order: the value returned for ``q`` is an item
whose rank in the data lies within :math:`\\varepsilon n` of :math:`q n`. A sketch keeps at most
about 8,800 doubles (about 70 KiB) per channel, whatever the length of the stream. While a
channel has fewer values than the sketch can keep it holds them all, and its quantiles are
exact (error 0). The KLL sketch was chosen over DataSketches' REQ sketch after measuring both
(``benchmarks/quantiles.py``): KLL has a float64 sketch (REQ's Python binding stores float32,
which loses data with a small spread far from zero), a uniform rank bound, and per-channel
``update`` on NumPy arrays.

uint8, int8 and bool values are counted exactly (384 counts per channel), so their quantiles are
exact; both kinds answer with NumPy's default (linear) quantile, interpolating between the two
order statistics around :math:`(n - 1) q`.
"""
from __future__ import annotations

import base64
import functools

import numpy as np

from jaxnorm._src import host_moments

DEFAULT_K = 2900
_CHANNEL_BLOCK = 64  # channels made contiguous in float64 at a time


def library():
  """The ``datasketches`` module (the ``quantiles`` extra), imported on first use."""
  try:
    import datasketches  # noqa: PLC0415 - an optional dependency
  except ImportError as error:
    raise ImportError(
        "quantiles of float data need Apache DataSketches: pip install 'jaxnorm[quantiles]' "
        "(or pass quantiles=False to fit moments only)"
    ) from error
  return datasketches


def new_sketch(k: int = DEFAULT_K):
  """An empty KLL sketch of doubles."""
  return library().kll_doubles_sketch(k)


@functools.cache
def rank_error(k: int = DEFAULT_K) -> float:
  """KLL's a-priori normalized rank error for one quantile, 99% confidence."""
  return float(library().kll_doubles_sketch(k).normalized_rank_error(False))


def update_sketches(sketches: list, x: np.ndarray, *, ignore_nan: bool) -> None:
  """Adds each column of the ``(values, channels)`` matrix ``x`` to its channel's sketch."""
  for first in range(0, x.shape[1], _CHANNEL_BLOCK):
    # A writable float64 copy: the binding refuses read-only views (memory-mapped files).
    block = np.array(x[:, first:first + _CHANNEL_BLOCK].T, dtype=np.float64, order="C")
    for offset, column in enumerate(block):
      if ignore_nan:
        column = column[~np.isnan(column)]
      sketches[first + offset].update(column)


def spill_counts(sketches: list, counts: np.ndarray) -> None:
  """Adds data given as exact value counts (``(channels, EXACT_SIZE)``) to the sketches."""
  chunk = 1 << 20
  for channel, row in enumerate(counts):
    for value, count in zip(host_moments.EXACT_VALUES[row > 0], row[row > 0]):
      for start in range(0, int(count), chunk):
        sketches[channel].update(np.full(min(chunk, int(count) - start), value))


def _linear(below_value, above_value, rank, below):
  return below_value + (rank - below) * (above_value - below_value)


def counts_quantile(counts: np.ndarray, q: float) -> np.ndarray:
  """NumPy's linear quantile per channel from exact value counts (NaN for an empty channel)."""
  count = counts.sum(1)
  cumulative = np.cumsum(counts, axis=1)
  rank = (np.maximum(count, 1) - 1) * q
  below = np.floor(rank)
  above = np.minimum(below + 1, np.maximum(count - 1, 0))

  def order_statistic(k):
    index = np.minimum(np.sum(cumulative <= k[:, None], axis=1), counts.shape[1] - 1)
    return host_moments.EXACT_VALUES[index]

  value = _linear(order_statistic(below), order_statistic(above), rank, below)
  return np.where(count > 0, value, np.nan)


def sketch_quantiles(sketch, q: np.ndarray) -> np.ndarray:
  """NumPy's linear quantiles from a sketch: exact while the sketch holds every value.

  The order statistic of 0-based rank ``k`` is the sketch's inclusive quantile at
  ``(k + 0.5) / n`` (the smallest item with at least ``k + 1`` items at or below it).
  """
  q = np.asarray(q, np.float64)
  n = sketch.n
  if n == 0:
    return np.full(q.shape, np.nan)
  rank = (n - 1) * q
  below = np.floor(rank)
  above = np.minimum(below + 1, n - 1)
  values = np.asarray(sketch.get_quantiles(np.concatenate([(below + 0.5) / n, (above + 0.5) / n]),
                                           inclusive=True))
  return _linear(values[:len(q)], values[len(q):], rank, below)


def sketch_error(sketch) -> float:
  """The sketch's normalized rank error bound: 0 while it holds every value."""
  if not sketch.is_estimation_mode():
    return 0.0
  return float(sketch.normalized_rank_error(False))


def to_text(sketch) -> str:
  """A sketch as base64 text of DataSketches' portable binary format."""
  return base64.b64encode(sketch.serialize()).decode("ascii")


def from_text(text: str):
  """The sketch written by :func:`to_text`; ValueError if the bytes are not a KLL sketch."""
  try:
    data = base64.b64decode(text.encode("ascii"), validate=True)
    return library().kll_doubles_sketch.deserialize(data)
  except Exception as error:  # noqa: BLE001 - binascii, RuntimeError, ...: all mean corrupt
    raise ValueError(f"not a serialized KLL sketch ({type(error).__name__}: {error})") from None
