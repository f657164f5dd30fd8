"""Exact per-channel moments of host data in float64, and their merge (Chan's formulas).

The one place where dataset statistics are reduced on the host. A batch is a ``(values,
channels)`` matrix (:func:`channels_last`); :func:`batch_moments` reduces it with the two-pass
formula in float64, or for 8-bit integer and bool data through exact value counts (one
``bincount``, which the quantiles reuse). :func:`merge` joins two parts with Chan, Golub and
LeVeque's parallel formulas ("Updating formulae and a pairwise algorithm for computing sample
variances", 1979):

.. math::

   n = n_a + n_b, \\quad \\delta = \\mu_b - \\mu_a, \\quad
   \\mu = \\mu_a + \\delta \\frac{n_b}{n}, \\quad
   M_2 = M_{2,a} + M_{2,b} + \\delta^2 \\frac{n_a n_b}{n},

so the result equals NumPy's float64 statistics of the concatenated data to about 1e-12
relative, whatever the offset, the batch sizes or the order of the merges.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks

# 8-bit integer and bool values are counted exactly on one grid of EXACT_SIZE values from
# EXACT_FIRST (-128, for int8) to 255 (uint8).
EXACT_FIRST = -128
EXACT_SIZE = 384
EXACT_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.bool_))
EXACT_VALUES = np.arange(EXACT_FIRST, EXACT_FIRST + EXACT_SIZE, dtype=np.float64)


class HostMoments(NamedTuple):
  """Per-channel count (int64), mean, sum of squared deviations ``m2``, minimum and maximum.

  An empty channel has count 0, mean 0, m2 0, min +inf and max -inf.
  """
  count: np.ndarray
  mean: np.ndarray
  m2: np.ndarray
  min: np.ndarray
  max: np.ndarray


def empty(channels: int) -> HostMoments:
  """The moments of no data."""
  zeros = np.zeros(channels, np.float64)
  return HostMoments(np.zeros(channels, np.int64), zeros, zeros.copy(),
                     np.full(channels, np.inf), np.full(channels, -np.inf))


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


def merge(a: HostMoments, b: HostMoments) -> HostMoments:
  """The moments of two disjoint parts together (Chan's parallel formulas, float64)."""
  total = a.count + b.count
  safe = np.maximum(total, 1)
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / safe)
  m2 = a.m2 + b.m2 + np.square(delta) * (a.count * (b.count / safe))
  return HostMoments(total, mean, m2, np.minimum(a.min, b.min), np.maximum(a.max, b.max))


def exact_counts(x: np.ndarray) -> np.ndarray:
  """``(channels, EXACT_SIZE)`` int64 counts of each value of an 8-bit or bool matrix."""
  channels = x.shape[1]
  index = x.astype(np.intp)
  index -= EXACT_FIRST
  index += np.arange(channels, dtype=np.intp) * EXACT_SIZE
  return np.bincount(index.ravel(), minlength=channels * EXACT_SIZE).reshape(
      channels, EXACT_SIZE).astype(np.int64)


def moments_of_counts(counts: np.ndarray) -> HostMoments:
  """Exact moments of data given as per-channel value counts on the exact grid."""
  count = counts.sum(1)
  safe = np.maximum(count, 1)
  mean = counts @ EXACT_VALUES / safe
  m2 = np.einsum("cv,cv->c", counts, np.square(EXACT_VALUES[None, :] - mean[:, None]))
  seen = counts > 0
  lo = np.where(count > 0, EXACT_VALUES[np.argmax(seen, 1)], np.inf)
  hi = np.where(count > 0, EXACT_VALUES[EXACT_SIZE - 1 - np.argmax(seen[:, ::-1], 1)], -np.inf)
  return HostMoments(count.astype(np.int64), mean, m2, lo, hi)


def check_values(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, ignore_nan: bool) -> None:
  """Raises on infinities, and on NaNs unless they are ignored (min and max reveal both)."""
  if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
    return
  has_nan = np.isnan(lo) | np.isnan(hi)
  if np.any(has_nan) and not ignore_nan:
    raise ValueError(
        f"a batch holds NaN in channel(s) {np.flatnonzero(has_nan).tolist()[:8]}; skip NaNs "
        f"with ignore_nan=True, or clean the data first")
  infinite = np.isinf(lo) | np.isinf(hi)
  if np.any(has_nan):  # a NaN hides infinities from min and max
    infinite = np.any(np.isinf(x), axis=0)
  if np.any(infinite):
    raise ValueError(
        f"a batch holds an infinite value in channel(s) {np.flatnonzero(infinite).tolist()[:8]}; "
        f"replace or drop infinities before fitting statistics")


def batch_moments(x: np.ndarray, *, ignore_nan: bool) -> tuple[HostMoments, np.ndarray | None]:
  """Exact moments of one ``(values, channels)`` batch, and its value counts if 8-bit.

  Float and wide integer batches are reduced in float64 with the two-pass formula; uint8, int8
  and bool batches through exact value counts, also returned (None otherwise).

  Raises:
    TypeError: not a real dtype.
    ValueError: infinities, or NaNs unless ``ignore_nan``.
  """
  if x.dtype.kind not in "biuf":
    raise TypeError(f"dataset statistics need real numbers, got a batch of dtype {x.dtype}")
  channels = x.shape[1]
  if x.shape[0] == 0:
    return empty(channels), None
  if x.dtype in EXACT_DTYPES:
    counts = exact_counts(x)
    return moments_of_counts(counts), counts
  with np.errstate(invalid="ignore"):
    lo = np.min(x, axis=0).astype(np.float64)
    hi = np.max(x, axis=0).astype(np.float64)
  check_values(x, lo, hi, ignore_nan)
  xf = x.astype(np.float64)
  if not np.any(np.isnan(lo)):
    count = np.full(channels, x.shape[0], np.int64)
    mean = np.sum(xf, axis=0) / x.shape[0]
    xf -= mean
  else:  # only with ignore_nan: NaNs are skipped
    valid = ~np.isnan(xf)
    lo = np.min(np.where(valid, xf, np.inf), axis=0)
    hi = np.max(np.where(valid, xf, -np.inf), axis=0)
    count = valid.sum(0).astype(np.int64)
    xf[~valid] = 0
    mean = np.sum(xf, axis=0) / np.maximum(count, 1)
    xf -= mean
    xf[~valid] = 0
  np.square(xf, out=xf)
  return HostMoments(count, mean, np.sum(xf, axis=0), lo, hi), None
