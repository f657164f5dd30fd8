"""Moments of the valid elements of an array: masked, count-weighted, stable, cross-device.

The reference path: every normalization and the dataset statistics reduce an array to a mean
and a variance here. The variance is computed in a *shifted* frame. With a reference value
:math:`K` taken from the data itself (per channel, without gradient),

.. math::

   \\mu = K + \\frac{1}{n}\\sum_i (x_i - K), \\qquad
   \\sigma^2 = \\frac{1}{n}\\sum_i (x_i - K)^2 - \\Big(\\frac{1}{n}\\sum_i (x_i - K)\\Big)^2 .

The cancellation then happens between numbers of the size of the spread, not of the offset:
float32 data with standard deviation 1 at an offset of 1e6 keeps about 1e-6 relative accuracy,
where the fast :math:`E[x^2] - E[x]^2` returns garbage from an offset of 1e4 (Chan, Golub and
LeVeque, "Algorithms for computing the sample variance", 1983). The result keeps the shift
:math:`K` and the *residual* :math:`\\mu - K` apart (:class:`Moments`): normalizing with
``(x - K) - residual`` keeps the output accurate too.

Across devices (``axis_name``, or ``x`` sharded over an Explicit mesh), each device reduces its
own elements and :mod:`jaxnorm._src.collectives` merges them by count with one collective.

The sums themselves are one dispatched operation (``"moment_sums"``, :mod:`jaxnorm._src.dispatch`):
on XLA a tuned path takes plain sums where every mean is near 0 (:mod:`jaxnorm._src.fast.xla`).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import collectives
from jaxnorm._src import dispatch

Axes = int | Sequence[int] | None
AxisName = Hashable
Groups = Sequence[Sequence[int]] | None


class Moments(NamedTuple):
  """Statistics of the valid elements, with reduced axes kept as size 1.

  Attributes:
    count: number of valid elements.
    shift: a reference value :math:`K` near the data (no gradient flows through it).
    residual: the mean minus ``shift``.
    var: the biased (population) variance, :math:`E|x - \\mu|^2` (real for complex ``x``).
  """
  count: Array
  shift: Array
  residual: Array
  var: Array

  @property
  def mean(self) -> Array:
    """The mean, ``shift + residual``."""
    return self.shift + self.residual

  def centred(self, xf: Array) -> Array:
    """``x - mean``, computed as ``(x - shift) - residual``: exact for ``x`` near the data."""
    return (xf - self.shift) - self.residual

  def standardize(self, xf: Array, epsilon: float) -> Array:
    """``(x - mean) / sqrt(var + epsilon)``."""
    return self.centred(xf) * lax.rsqrt(self.var + epsilon)


def safe_divide(numerator: Array, count: Array) -> Array:
  """numerator / count, and 0 (with zero gradient) where count is 0."""
  return numerator / jnp.where(count > 0, count, 1)


def reduce_sum(a: Array, axes: tuple[int, ...], group_size: int | None = None) -> Array:
  """Sum of ``a`` over ``axes`` (kept as size 1).

  With ``group_size``, the last axis (one of ``axes``) is summed in groups of ``group_size``
  consecutive entries, each group's sum repeated over its entries: first over the other axes
  per channel, then over each group's channels. On channels-last images this is many times
  faster than one reduction over a ``(..., groups, group_size)`` view.
  """
  if group_size is None:
    return jnp.sum(a, axis=axes, keepdims=True)
  inner = tuple(axis for axis in axes if axis != a.ndim - 1)
  if inner:
    a = jnp.sum(a, axis=inner, keepdims=True)
  grouped = jnp.sum(a.reshape(a.shape[:-1] + (-1, group_size)), axis=-1, keepdims=True)
  return spread_groups(grouped, a.shape)


def spread_groups(grouped: Array, shape: tuple[int, ...]) -> Array:
  """Per-group values of shape ``(..., groups, 1)`` repeated over each group's channels."""
  group_size = shape[-1] // grouped.shape[-2]
  return jnp.broadcast_to(grouped, grouped.shape[:-1] + (group_size,)).reshape(shape)


def valid_count(shape: tuple[int, ...], where: Array | None, axes: tuple[int, ...], dtype,
                group_size: int | None = None) -> Array:
  """Number of valid elements over ``axes`` (kept as size 1; per group with ``group_size``)."""
  if where is None:
    grouped = group_size is not None and len(shape) - 1 in axes
    kept = tuple(1 if a in axes and not (grouped and a == len(shape) - 1) else n
                 for a, n in enumerate(shape))
    size = math.prod(shape[a] for a in axes if not (grouped and a == len(shape) - 1))
    return jnp.full(kept, size * (group_size if grouped else 1), dtype)
  return reduce_sum(jnp.broadcast_to(where, shape).astype(dtype), axes, group_size)


def data_shift(xf: Array, axes: tuple[int, ...], where: Array | None, count: Array,
               group_size: int | None = None) -> Array:
  """A reference value per channel (per group), taken from the valid data, without gradient.

  Unmasked: the first element along the reduced axes. Masked: the mean of the valid elements in
  the first slice of the first reduced axis (a small part of x); where that slice holds no valid
  element of a channel that has some, the mean of all valid elements (an extra pass over x,
  taken at run time only then). Any value gives the same statistics in exact arithmetic; one
  within a few standard deviations of the data keeps them accurate.
  """
  if where is None:
    inner = tuple(a for a in axes if group_size is None or a != xf.ndim - 1)
    first = xf[tuple(slice(0, 1) if a in inner else slice(None) for a in range(xf.ndim))]
    if group_size is not None:
      first = spread_groups(first.reshape(first.shape[:-1] + (-1, group_size))[..., :1],
                            first.shape)
    return lax.stop_gradient(first)
  if not axes:  # nothing is reduced: each valid element is its own reference
    return lax.stop_gradient(jnp.where(where, xf, 0))
  first, rest = axes[0], axes[1:]
  index = tuple(slice(0, 1) if a == first else slice(None) for a in range(xf.ndim))
  x_slice, w_slice = xf[index], jnp.broadcast_to(where, xf.shape)[index]
  slice_total = reduce_sum(jnp.where(w_slice, x_slice, 0), rest, group_size)
  slice_count = reduce_sum(w_slice.astype(checks.real_dtype(xf.dtype)), rest, group_size)
  shift = lax.cond(
      jnp.any((slice_count == 0) & (count > 0)),
      lambda: safe_divide(reduce_sum(jnp.where(where, xf, 0), axes, group_size), count),
      lambda: safe_divide(slice_total, slice_count))
  return lax.stop_gradient(shift)


def moment_sums(xf: Array, count: Array, where: Array | None, axes: tuple[int, ...],
                group_size: int | None) -> tuple[Array, Array, Array]:
  """The shift, and the sums of ``x - shift`` and of its square over the valid elements."""
  shift = data_shift(xf, axes, where, count, group_size)
  centred = xf - shift
  if where is not None:
    centred = jnp.where(where, centred, 0)
  return (shift, reduce_sum(centred, axes, group_size),
          reduce_sum(checks.abs_square(centred), axes, group_size))


def local_moments(xf: Array, axes: tuple[int, ...], where: Array | None = None,
                  group_size: int | None = None) -> Moments:
  """This device's moments of the valid elements of ``xf`` (float32 or wider) over ``axes``.

  ``axes`` canonical, ``where`` None or a mask of x's rank (:func:`checks.broadcast_mask`).
  With ``group_size``, the last axis is reduced in groups of that many channels, each group's
  moments repeated over its channels (:func:`reduce_sum`).
  """
  count = valid_count(xf.shape, where, axes, checks.real_dtype(xf.dtype), group_size)
  sums = dispatch.path("moment_sums", moment_sums)
  shift, total, total_sq = sums(xf, count, where, axes, group_size)
  residual = safe_divide(total, count)
  var = jnp.maximum(safe_divide(total_sq, count) - checks.abs_square(residual), 0)
  return Moments(count, shift, residual, var)


def pooled_moments(x: Array, axes: tuple[int, ...], where: Array | None,
                   axis_name: AxisName | None, axis_index_groups: Groups = None,
                   group_size: int | None = None) -> Moments:
  """Moments over ``axes`` of every device's valid elements (checked arguments).

  With ``axis_name``, this device's moments are merged with every other's in one collective.
  Without it, ``x`` sharded over an Explicit mesh along ``axes`` is reduced shard by shard and
  merged the same way; otherwise the moments are this device's (XLA partitions the reductions
  of ``x`` sharded over an Auto mesh itself).
  """
  xf = x.astype(checks.reduction_dtype(x.dtype))
  if axis_name is None:
    shards = collectives.explicit_shards(x, axes)
    if shards is not None:
      if group_size is not None:
        return _grouped_view_moments(xf, axes, where, None, None, group_size)
      return collectives.pool_explicit_shards(
          lambda xs, ws: local_moments(xs, axes, ws), xf, axes, where, shards)
  moments = local_moments(xf, axes, where, group_size)
  if axis_name is not None:
    moments = collectives.pool_moments(moments, axis_name, axis_index_groups)
  return moments


def group_moments(x: Array, axes: tuple[int, ...], group_size: int, where: Array | None,
                  axis_name: AxisName | None, axis_index_groups: Groups = None) -> Moments:
  """Moments over ``axes`` and over groups of ``group_size`` consecutive channels (last axis).

  ``axes`` includes the last axis. The result keeps the reduced axes but the last as size 1;
  along the last axis each group's moments are repeated over its channels. The statistics are
  those of a ``(..., groups, group_size)`` view of ``x``, computed in two stages (per channel,
  then per group) that read ``x`` in its own layout.
  """
  if all(a == x.ndim - 1 for a in axes):
    return _grouped_view_moments(x, axes, where, axis_name, axis_index_groups, group_size)
  return pooled_moments(x, axes, where, axis_name, axis_index_groups, group_size)


def _grouped_view_moments(x: Array, axes: tuple[int, ...], where: Array | None,
                          axis_name: AxisName | None, axis_index_groups: Groups,
                          group_size: int) -> Moments:
  """:func:`group_moments` through a ``(..., groups, group_size)`` view of ``x``."""
  channels = x.shape[-1]
  view = x.shape[:-1] + (channels // group_size, group_size)
  if where is not None:
    tail = (1, 1) if where.shape[-1] == 1 else view[-2:]
    where = where.reshape(where.shape[:-1] + tail)
  inner = tuple(a for a in axes if a != x.ndim - 1)
  grouped = pooled_moments(x.reshape(view), inner + (x.ndim,), where, axis_name,
                           axis_index_groups)
  shape = grouped.var.shape[:-2] + (channels,)
  return Moments(*(spread_groups(m, shape) for m in grouped))


def reduce_moments(x: ArrayLike, axes: Axes, *, where: ArrayLike | None = None,
                   axis_name: AxisName | None = None,
                   axis_index_groups: Groups = None) -> Moments:
  """Moments of the valid elements of ``x`` over ``axes`` and over the devices of ``axis_name``.

  Returns a :class:`Moments` whose arrays keep the reduced axes as size 1, in float32 or wider
  (``axes=None``: every axis). Under sharded ``jit`` no ``axis_name`` is needed. Where ``x`` is
  sharded over an Explicit mesh (``jax.make_mesh``'s default) along the reduced axes, each
  shard's moments are pooled with one all_gather, as with ``axis_name``; under an Auto mesh XLA
  reduces over the shards itself (a few all-reduces).
  """
  x = jnp.asarray(x)
  axes = checks.canonical_axes(axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  return pooled_moments(x, axes, where, axis_name, axis_index_groups)


def moments(x: ArrayLike, axes: Axes = None, *, where: ArrayLike | None = None,
            axis_name: AxisName | None = None, axis_index_groups: Groups = None,
            keepdims: bool = False) -> tuple[Array, Array]:
  """Mean and (biased) variance of the valid elements of ``x`` over ``axes``.

  .. math::

     \\mu = \\frac{1}{n}\\sum_{i \\in \\text{valid}} x_i, \\qquad
     \\sigma^2 = \\frac{1}{n}\\sum_{i \\in \\text{valid}} (x_i - \\mu)^2

  Reduced in at least float32 with a shifted formula that stays accurate far from zero. With
  ``axis_name``, the statistics are those of every device's valid elements together
  (count-weighted, one collective); a device with none contributes nothing. Where no element is
  valid at all, mean and variance are 0, never NaN.

  Args:
    x: input array (any real dtype: statistics come back in float32, or float64 for float64;
      complex: a complex mean and the real variance :math:`E|x - \\mu|^2`, as Flax's).
    axes: the axes to reduce; None (the default) reduces every axis, as in NumPy.
    where: optional mask broadcastable to ``x``; only its True elements count.
    axis_name: optional name of a mapped axis (``vmap``, ``pmap``, ``shard_map``), or a tuple
      of names, to pool over.
    axis_index_groups: optional groups of device indices along ``axis_name`` to pool within.
    keepdims: keep the reduced axes as size 1.

  Returns:
    ``(mean, var)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1e6 + 1.0, 1e6 - 1.0], [1e6 + 3.0, 0.0]])
    >>> mean, var = jaxnorm.moments(x, 0, where=x > 0)
    >>> mean, var
    (Array([1000002., 999999.], dtype=float32), Array([1., 0.], dtype=float32))
  """
  x = jnp.asarray(x)
  axes = checks.canonical_axes(axes, x.ndim, shape=x.shape)
  result = pooled_moments(x, axes, checks.broadcast_mask(where, x.shape), axis_name,
                          axis_index_groups)
  mean, var = result.mean, result.var
  if not keepdims:
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var


def mean_square(xf: Array, axes: tuple[int, ...], where: Array | None = None,
                axis_name: AxisName | None = None, axis_index_groups: Groups = None) -> Array:
  """Mean of ``|x|**2`` over the valid elements (reduced axes kept as size 1), pooled by count.

  No cancellation can occur, so no shift is needed; across devices one ``psum`` of the stacked
  count and sum of squares suffices.
  """
  squares = checks.abs_square(xf)
  total = jnp.sum(squares if where is None else jnp.where(where, squares, 0), axis=axes,
                  keepdims=True)
  count = valid_count(xf.shape, where, axes, squares.dtype)
  if axis_name is not None:
    count, total = collectives.psum(jnp.stack([count, total]), axis_name, axis_index_groups)
  return safe_divide(total, count)
