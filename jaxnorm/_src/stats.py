"""Moments of the valid elements of an array: masked, count-weighted, stable, cross-device.

This file is the only place where jaxnorm reduces an array to a mean and a variance. Every
normalization, every layer and the dataset statistics call it.

The variance is computed in a *shifted* frame. With a reference value :math:`K` taken from the
data itself (per channel, without gradient),

.. math::

   \\mu = K + \\frac{1}{n}\\sum_i (x_i - K), \\qquad
   \\sigma^2 = \\frac{1}{n}\\sum_i (x_i - K)^2 - \\Big(\\frac{1}{n}\\sum_i (x_i - K)\\Big)^2 .

XLA fuses the subtraction into both sums, which read ``x`` as often as the sums of the fast
:math:`E[x^2] - E[x]^2` formula do (the same planned bytes, forward and backward), but the
cancellation happens between numbers of the size of the spread, not of the offset: float32
data with standard deviation 1 at an offset of 1e6 keeps about 1e-6 relative accuracy, where the
fast formula returns garbage from an offset of 1e4 (Chan, Golub and LeVeque, "Algorithms for
computing the sample variance", 1983). Normalizing in the frame of the rounded mean
:math:`m = K + (\\mu - K)`, :math:`y = ((x - m) - ((K - m) + (\\mu - K))) / \\sigma`, keeps the
output accurate too (:math:`x - m` is exact for :math:`x` near :math:`m`).

Where every mean lies within 4 standard deviations of 0 (the usual case for activations), the
shift is 0 and the plain sums of ``x`` and ``x**2`` serve, which XLA reduces fastest: the
shifted pass runs only where they would lose accuracy (decided at run time, ``lax.cond``).

Across devices, each device reduces its own elements, then one ``all_gather`` brings every
device's ``(count, shift, mean, var)`` to all of them, and they are merged with Chan's parallel
formulas, weighted by count: the result is exactly the statistics of all valid elements together.
A device with no valid element has count 0 and contributes nothing.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import checks

Axes = int | Sequence[int]
AxisName = Hashable


class Moments(NamedTuple):
  """Statistics of the valid elements, with reduced axes kept as size 1.

  Attributes:
    count: number of valid elements.
    shift: the reference value :math:`K` (no gradient flows through it).
    mean: the mean minus ``shift``.
    var: the biased (population) variance.
  """
  count: Array
  shift: Array
  mean: Array
  var: Array

  @property
  def full_mean(self) -> Array:
    """The mean itself, ``shift + mean``."""
    return self.shift + self.mean

  def standardize(self, xf: Array, epsilon: float) -> Array:
    """``(x - mean) / sqrt(var + epsilon)``, computed in the shifted frame."""
    # In the frame of the rounded mean m = K + mean: x - m is exact for x near m (Sterbenz), and
    # (K - m) + mean is the small part of the mean that rounding left out. Same accuracy as
    # (x - K) - mean, but it shares no full-size ``x - K`` with the sums, so XLA fuses the sums
    # and this output into passes over x instead of writing ``x - K`` to memory.
    return ((xf - self.shift) - self.mean) * lax.rsqrt(self.var + epsilon)


def _safe_divide(numerator: Array, count: Array) -> Array:
  """numerator / count, and 0 (with zero gradient) where count is 0."""
  return numerator / jnp.where(count > 0, count, 1)


def _first_along(x: Array, axes: tuple[int, ...]) -> Array:
  """x at index 0 of every axis in ``axes``, keeping them as size 1."""
  index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
  return x[index]


def _reduce_sum(a: Array, axes: tuple[int, ...], group_size: int | None = None) -> Array:
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
  return _spread_groups(_sum_groups(a, group_size), a.shape)


def _sum_groups(a: Array, group_size: int) -> Array:
  """``a``'s last axis summed in groups of ``group_size``, shape ``(..., groups, 1)``."""
  return jnp.sum(a.reshape(a.shape[:-1] + (-1, group_size)), axis=-1, keepdims=True)


def _spread_groups(grouped: Array, shape: tuple[int, ...]) -> Array:
  """Per-group values of shape ``(..., groups, 1)`` repeated over each group's channels."""
  group_size = shape[-1] // grouped.shape[-2]
  return jnp.broadcast_to(grouped, grouped.shape[:-1] + (group_size,)).reshape(shape)


def _shift(xf: Array, axes: tuple[int, ...], where: Array | None, count: Array | None,
           group_size: int | None = None) -> Array:
  """A reference value per channel, taken from the valid data, without gradient.

  Unmasked: the first element along the reduced axes. Masked: the mean of the valid elements in
  the first slice of the first reduced axis (a small part of x); where that slice holds no valid
  element of a channel that has some, the mean of all valid elements (an extra pass over x,
  taken at run time only then). Any value gives the same statistics in exact arithmetic; one
  within a few standard deviations of the data keeps them accurate.
  """
  if where is None:
    if group_size is None:
      return lax.stop_gradient(_first_along(xf, axes))
    first = _first_along(xf, tuple(a for a in axes if a != xf.ndim - 1))
    grouped = first.reshape(first.shape[:-1] + (-1, group_size))[..., :1]
    return lax.stop_gradient(_spread_groups(grouped, first.shape))
  if not axes:  # nothing is reduced: each valid element is its own reference
    return lax.stop_gradient(jnp.where(where, xf, 0))
  first, rest = axes[0], axes[1:]
  index = tuple(slice(0, 1) if a == first else slice(None) for a in range(xf.ndim))
  x_slice = xf[index]
  w_slice = jnp.broadcast_to(where, xf.shape)[index]
  slice_total = _reduce_sum(jnp.where(w_slice, x_slice, 0), rest, group_size)
  slice_count = _reduce_sum(w_slice.astype(xf.dtype), rest, group_size)
  needs_full_mean = jnp.any((slice_count == 0) & (count > 0))
  shift = lax.cond(
      needs_full_mean,
      lambda: _safe_divide(_reduce_sum(jnp.where(where, xf, 0), axes, group_size), count),
      lambda: _safe_divide(slice_total, slice_count))
  return lax.stop_gradient(shift)


def _sums(xf: Array, shift: Array, where: Array | None, axes: tuple[int, ...],
          group_size: int | None = None):
  """Sums of ``x - shift`` and of its square over the valid elements, reduced axes kept."""
  # The same values, spelled twice: XLA would otherwise share one full-size ``x - shift``
  # between the two sums and write it to memory (4N bytes moved instead of 2N). Spelled apart,
  # each sum fuses its own subtraction and reads x once, like E[x^2] - E[x]^2.
  centred, centred_again = xf - shift, xf + (-shift)
  if where is not None:
    centred, centred_again = jnp.where(where, centred, 0), jnp.where(where, centred_again, 0)
  return (_reduce_sum(centred_again, axes, group_size),
          _reduce_sum(centred * centred, axes, group_size))


# The plain sums are used where every mean is within 4 standard deviations of 0: there
# E[x^2] - E[x]^2 loses at most a factor 17 of the sums' own rounding, about what a shift by one
# sample loses (its distance to the mean is a standard deviation or more).
_NEAR_ZERO = 16.0


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _frame_and_sums(xf: Array, count: Array, where: Array | None, axes: tuple[int, ...],
                    group_size: int | None) -> tuple[Array, Array, Array]:
  """The shift and the sums of ``x - shift`` and of its square over the valid elements.

  First the plain sums of ``x`` and ``x**2`` (shift 0), which XLA reduces fastest (a
  subtraction inside a reduction costs CPUs up to half a memory pass more). Only where some
  mean is farther than 4 standard deviations from 0 (or a sum is not finite), a second pass
  takes :func:`_shift` and :func:`_sums`, at run time (``lax.cond``; under ``vmap`` both run).

  The derivative, d(sum of c) = sum of dc and d(sum of c^2) = sum of 2c dc over the valid
  elements, computes c = x - shift as (x - m) + (m - shift) around the rounded mean
  m = shift + sum / count: the same values, but nothing in common with the forward sums, which
  XLA would otherwise write to memory to share (23N bytes moved instead of 21N for a batch norm
  training step). ``count`` gets no derivative (it counts the mask), nor does the shift.
  """
  valid = xf if where is None else jnp.where(where, xf, 0)
  total = _reduce_sum(valid, axes, group_size)
  total_sq = _reduce_sum(valid * valid, axes, group_size)
  mean = _safe_divide(total, count)
  spread = _safe_divide(total_sq, count) - mean * mean
  near_zero = (mean * mean <= _NEAR_ZERO * spread) | (count == 0)

  def shifted():
    # The plain sums still where the mean is near 0: each channel's statistics then do not
    # depend on the other channels' (under vmap, where cond becomes select, each example
    # decides alone, and its results are those of the batch).
    shift = jnp.where(near_zero, 0, _shift(xf, axes, where, count, group_size))
    shifted_total, shifted_total_sq = _sums(xf, shift, where, axes, group_size)
    return (shift, jnp.where(near_zero, total, shifted_total),
            jnp.where(near_zero, total_sq, shifted_total_sq))

  return lax.cond(jnp.all(near_zero), lambda: (jnp.zeros_like(total), total, total_sq), shifted)


@_frame_and_sums.defjvp
def _frame_and_sums_jvp(axes, group_size, primals, tangents):
  xf, count, where = primals
  dx = tangents[0]
  shift, total, total_sq = _frame_and_sums(xf, count, where, axes, group_size)
  rounded_mean = shift + _safe_divide(total, count)
  # x + (-m), not x - m: the output's x - m is a different expression, so XLA does not write
  # one shared array to memory for both
  centred = (xf + (-rounded_mean)) + (rounded_mean - shift)
  dc = dx if where is None else jnp.where(where, dx, 0)
  d_total = _reduce_sum(dc, axes, group_size)
  d_total_sq = _reduce_sum(2 * centred * dc, axes, group_size)
  return (shift, total, total_sq), (jnp.zeros_like(shift), d_total, d_total_sq)


def local_moments(x: ArrayLike, axes: Axes, *, where: ArrayLike | None = None) -> Moments:
  """Moments of this device's valid elements of ``x`` over ``axes`` (kept as size 1)."""
  return _local_moments(x, axes, where, None)


def _local_moments(x: ArrayLike, axes: Axes, where: ArrayLike | None,
                   group_size: int | None) -> Moments:
  """:func:`local_moments`; with ``group_size``, per group of channels (see :func:`_reduce_sum`)."""
  x = jnp.asarray(x)
  axes = checks.canonical_axes(axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  if where is None:
    size = group_size or 1
    for a in axes:
      size *= x.shape[a] if group_size is None or a != x.ndim - 1 else 1
    kept = tuple(1 if a in axes and (group_size is None or a != x.ndim - 1) else n
                 for a, n in enumerate(x.shape))
    count = jnp.full(kept, size, xf.dtype)
  else:
    count = _reduce_sum(jnp.broadcast_to(where, x.shape).astype(xf.dtype), axes, group_size)
  shift, total, total_sq = _frame_and_sums(xf, count, where, axes, group_size)
  mean = _safe_divide(total, count)
  var = jnp.maximum(_safe_divide(total_sq, count) - mean * mean, 0)
  return Moments(count, shift, mean, var)


def fused_row_moments(xf: Array, axes: tuple[int, ...]) -> Moments:
  """Unmasked moments over ``axes`` by a corrected two-pass formula.

  .. math:: m = \\frac{1}{n}\\sum_i x_i, \\quad r = \\frac{1}{n}\\sum_i (x_i - m), \\quad
     \\sigma^2 = \\frac{1}{n}\\sum_i \\big((x_i - m) - r\\big)^2

  The correction of the corrected two-pass algorithm (Chan, Golub and LeVeque 1983), the mean
  of ``x - m``, is taken out of the deviations before they are squared; the result is returned
  in the frame of the rounded mean: shift ``m`` (no gradient) and mean ``r``, the part of the
  mean that rounding left out of ``m``. As accurate as the shifted sums at any offset, and three
  reductions with nothing full-size in between: over trailing axes, XLA's CPU backend fuses
  them with the normalization into one kernel that reads each row from memory once (from 4096
  rows up). Differentiable as written (``m`` carries no gradient); the layers differentiate
  their closed form instead. With nothing to reduce, the moments are 0.
  """
  count = math.prod(xf.shape[a] for a in axes)
  if count == 0:
    zeros = jnp.zeros_like(jnp.sum(xf, axis=axes, keepdims=True))
    return Moments(zeros, zeros, zeros, zeros)
  m = lax.stop_gradient(jnp.sum(xf, axis=axes, keepdims=True) / count)
  centred = xf - m
  r = jnp.sum(centred, axis=axes, keepdims=True) / count
  var = jnp.sum(jnp.square(centred - r), axis=axes, keepdims=True) / count
  return Moments(jnp.full(var.shape, count, xf.dtype), m, r, var)


_GATHER_CAN_BE_INVARIANT = "to" in inspect.signature(lax.all_gather).parameters


def _all_gather(stacked: Array, axis_name: AxisName,
                axis_index_groups: Sequence[Sequence[int]] | None) -> Array:
  """``lax.all_gather``, typed as the same on every device where ``shard_map`` tracks that.

  Inside ``jax.shard_map`` (with its default ``check_vma=True``) a plain all_gather's result
  counts as varying across devices, so pooled statistics could not leave with ``out_specs=P()``
  nor be stored as replicated running statistics. There the gather is the invariant one, whose
  transpose is the matching slice of the cotangent. Under ``vmap`` and ``pmap`` (nothing tracked)
  it is the plain one, whose transpose sums every device's cotangent.
  """
  names = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
  aval = jax.typeof(stacked) if hasattr(jax, "typeof") else None
  varying = getattr(aval, "vma", None) or getattr(getattr(aval, "mat", None), "varying", ())
  if _GATHER_CAN_BE_INVARIANT and axis_index_groups is None and names <= set(varying):
    return lax.all_gather(stacked, axis_name, to="invarying")
  return lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)


def pool_moments(moments: Moments, axis_name: AxisName, *,
                 axis_index_groups: Sequence[Sequence[int]] | None = None) -> Moments:
  """Merges every device's moments into those of all their elements, with one all_gather.

  Chan's parallel formulas, weighted by count, in the frame of the first device that has a
  valid element:

  .. math::

     n = \\sum_d n_d, \\quad \\mu = \\frac{1}{n}\\sum_d n_d \\mu_d, \\quad
     \\sigma^2 = \\frac{1}{n}\\sum_d n_d\\big(\\sigma_d^2 + (\\mu_d - \\mu)^2\\big).
  """
  stacked = jnp.stack(moments)
  gathered = _all_gather(stacked, axis_name, axis_index_groups)
  return merge_moments(Moments(*(gathered[:, i] for i in range(4))))


def merge_moments(parts: Moments) -> Moments:
  """Merges moments stacked along a leading axis (one entry per part) into those of all parts.

  The merge of :func:`pool_moments`, for callers that gather the parts themselves (for example
  together with other per-part values, in the same collective).
  """
  counts, shifts, means, variances = parts
  reference = jnp.argmax(counts > 0, axis=0)[None]
  shift = lax.stop_gradient(jnp.take_along_axis(shifts, reference, axis=0)[0])
  device_means = (shifts - shift) + means
  count = jnp.sum(counts, axis=0)
  mean = _safe_divide(jnp.sum(counts * device_means, axis=0), count)
  spread = counts * (variances + jnp.square(device_means - mean))
  var = _safe_divide(jnp.sum(spread, axis=0), count)
  return Moments(count, shift, mean, var)


def _explicit_shards(x: Array, axes: tuple[int, ...]):
  """The mesh, x's partition entries, and the Explicit mesh axes that shard the ``axes`` of x.

  Only sharding in types (an Explicit mesh, ``jax.make_mesh``'s default) is visible while
  tracing; under an Auto mesh this finds nothing and XLA partitions the reductions itself.
  """
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  if explicit is None or not hasattr(jax, "typeof"):  # JAX without sharding in types
    return None
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  entries = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  names = []
  for axis in axes:
    entry = entries[axis]
    for name in () if entry is None else entry if isinstance(entry, tuple) else (entry,):
      if types.get(name) == explicit:
        names.append(name)
  return (mesh, entries, tuple(names)) if names else None


def _pool_explicit_shards(x: Array, axes: tuple[int, ...], where: Array | None,
                          shards) -> Moments:
  """Each shard's moments, pooled over the mesh axes that shard ``axes``: one all_gather."""
  mesh, entries, names = shards
  spec = jax.sharding.PartitionSpec
  out_spec = spec(*(None if a in axes else entry for a, entry in enumerate(entries)))

  def pooled(x_shard, *where_shard):
    local = local_moments(x_shard, axes, where=where_shard[0] if where_shard else None)
    return pool_moments(local, names)

  if where is None:
    return jax.shard_map(pooled, mesh=mesh, in_specs=(spec(*entries),), out_specs=out_spec)(x)
  where = jnp.reshape(where, (1,) * (x.ndim - where.ndim) + where.shape)
  where_spec = spec(*(None if where.shape[a] == 1 else entry for a, entry in enumerate(entries)))
  where = jax.sharding.reshard(where, jax.sharding.NamedSharding(mesh, where_spec))
  return jax.shard_map(pooled, mesh=mesh, in_specs=(spec(*entries), where_spec),
                       out_specs=out_spec)(x, where)


def reduce_moments(x: ArrayLike, axes: Axes, *, where: ArrayLike | None = None,
                   axis_name: AxisName | None = None,
                   axis_index_groups: Sequence[Sequence[int]] | None = None) -> Moments:
  """Moments of the valid elements of ``x`` over ``axes`` and over the devices of ``axis_name``.

  Returns a :class:`Moments` whose arrays keep the reduced axes as size 1, in float32 or wider.
  Under sharded ``jit`` no ``axis_name`` is needed. Where ``x`` is sharded over an Explicit
  mesh (``jax.make_mesh``'s default) along the reduced axes, each shard's moments are pooled
  with one all_gather, as with ``axis_name``; under an Auto mesh XLA reduces over the shards
  itself (a few all-reduces).
  """
  if axis_name is None:
    x = jnp.asarray(x)
    reduced = checks.canonical_axes(axes, x.ndim, shape=x.shape)
    shards = _explicit_shards(x, reduced)
    if shards is not None:
      return _pool_explicit_shards(x, reduced, checks.broadcast_mask(where, x.shape), shards)
  moments = local_moments(x, axes, where=where)
  if axis_name is not None:
    moments = pool_moments(moments, axis_name, axis_index_groups=axis_index_groups)
  return moments


def group_moments(x: ArrayLike, axes: Axes, group_size: int, *,
                  where: ArrayLike | None = None, axis_name: AxisName | None = None,
                  axis_index_groups: Sequence[Sequence[int]] | None = None) -> Moments:
  """Moments over ``axes`` and over groups of ``group_size`` consecutive channels (last axis).

  ``axes`` must include the last axis. The result keeps the reduced axes but the last as size 1;
  along the last axis each group's moments are repeated over its channels, so that they
  broadcast against ``x`` as they are. The statistics are those of :func:`reduce_moments` over
  a ``(..., groups, group_size)`` view of ``x``, computed in two stages (per channel, then per
  group) that read ``x`` in its own layout.
  """
  x = jnp.asarray(x)
  axes = checks.canonical_axes(axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  channels = x.shape[-1]
  inner = tuple(a for a in axes if a != x.ndim - 1)
  sharded = axis_name is None and _explicit_shards(x, axes) is not None
  if not inner or sharded or x.ndim - 1 not in axes:
    grouped_shape = x.shape[:-1] + (channels // group_size, group_size)
    if where is not None:
      tail = (1, 1) if where.shape[-1] == 1 else (channels // group_size, group_size)
      where = where.reshape(where.shape[:-1] + tail)
    grouped = reduce_moments(x.reshape(grouped_shape), inner + (x.ndim,), where=where,
                             axis_name=axis_name, axis_index_groups=axis_index_groups)
    shape = grouped.var.shape[:-2] + (channels,)
    return Moments(*(_spread_groups(m, shape) for m in grouped))
  result = _local_moments(x, axes, where, group_size)
  if axis_name is not None:
    result = pool_moments(result, axis_name, axis_index_groups=axis_index_groups)
  return result


def moments(x: ArrayLike, axes: Axes, *, where: ArrayLike | None = None,
            axis_name: AxisName | None = None,
            axis_index_groups: Sequence[Sequence[int]] | None = None,
            keepdims: bool = False) -> tuple[Array, Array]:
  """Mean and (biased) variance of the valid elements of ``x`` over ``axes``.

  .. math::

     \\mu = \\frac{1}{n}\\sum_{i \\in \\text{valid}} x_i, \\qquad
     \\sigma^2 = \\frac{1}{n}\\sum_{i \\in \\text{valid}} (x_i - \\mu)^2

  Reduced in at least float32 with a shifted one-pass formula that stays accurate far from zero.
  With ``axis_name``, the statistics are those of every device's valid elements together
  (count-weighted, one collective); a device with none contributes nothing. Where no element is
  valid at all, mean and variance are 0, never NaN.

  Args:
    x: input array (any real dtype; statistics come back in float32, or float64 for float64).
    axes: the axes to reduce.
    where: optional mask broadcastable to ``x``; only its True elements count.
    axis_name: optional name of a mapped axis (``vmap``, ``pmap``, ``shard_map``) to pool over.
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
  result = reduce_moments(x, axes, where=where, axis_name=axis_name,
                          axis_index_groups=axis_index_groups)
  mean, var = result.full_mean, result.var
  if not keepdims:
    axes = checks.canonical_axes(axes, jnp.ndim(x))
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var


def valid_count(shape: tuple[int, ...], where: Array | None, axes: tuple[int, ...],
                dtype) -> Array:
  """Number of valid elements over ``axes`` (kept as size 1): the mask's sum, or the size."""
  if where is None:
    kept = tuple(1 if a in axes else n for a, n in enumerate(shape))
    return jnp.full(kept, math.prod(shape[a] for a in axes), dtype)
  return jnp.sum(jnp.broadcast_to(where, shape), axis=axes, keepdims=True, dtype=dtype)


def mean_square(x: ArrayLike, axes: Axes, *, where: ArrayLike | None = None,
                axis_name: AxisName | None = None,
                axis_index_groups: Sequence[Sequence[int]] | None = None) -> Array:
  """Mean of ``x**2`` over the valid elements (reduced axes kept as size 1), pooled by count.

  No cancellation can occur, so no shift is needed; across devices one ``psum`` of the stacked
  count and sum of squares suffices.
  """
  x = jnp.asarray(x)
  axes = checks.canonical_axes(axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  squares = xf * xf
  total = jnp.sum(squares if where is None else jnp.where(where, squares, 0), axis=axes,
                  keepdims=True)
  count = valid_count(x.shape, where, axes, xf.dtype)
  if axis_name is not None:
    count, total = lax.psum(jnp.stack([count, total]), axis_name,
                            axis_index_groups=axis_index_groups)
  return _safe_divide(total, count)

