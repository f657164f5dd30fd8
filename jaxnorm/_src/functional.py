"""Layer, RMS, group and instance normalization, and normalization with given statistics.

Pure functions: statistics come from :mod:`jaxnorm._src.stats`, the output is
``(x - mean) / sqrt(var + epsilon) * scale + bias`` in at least float32, returned in
``dtype`` (by default the result type of ``x``, ``scale`` and ``bias``, as in Flax).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import stats
from jaxnorm._src.stats import AxisName, Axes

Groups = Sequence[Sequence[int]] | None


def affine(yf: Array, x: Array, scale: ArrayLike | None, bias: ArrayLike | None,
           feature_axes: tuple[int, ...], dtype: Any) -> Array:
  """``yf * scale + bias`` with per-feature parameters, cast to the output dtype."""
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
  params = [p for p in (scale, bias) if p is not None]
  if scale is not None:
    yf = yf * scale
  if bias is not None:
    yf = yf + bias
  return yf.astype(dtype or jnp.result_type(x.dtype, *(p.dtype for p in params)))


def normalize_moments(x: Array, moments: stats.Moments, scale: ArrayLike | None = None,
                      bias: ArrayLike | None = None, *, feature_axes: tuple[int, ...],
                      epsilon: float, dtype: Any = None, gain: Array | None = None,
                      offset: Array | None = None) -> Array:
  """``(x - mean) / sqrt(var + epsilon) * gain + offset``, then ``* scale + bias``.

  .. math:: y = \\Big(\\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\, g + o\\Big)
     \\gamma + \\beta

  ``moments`` (from :mod:`jaxnorm._src.stats`) broadcast against ``x``; ``gain`` and ``offset``
  (optional, batch renorm's r and d) against the moments. Where the parameters vary only along
  axes the moments keep (batch, group and instance norm), every factor is folded into one
  per-channel multiplier and one addend first, so the full-size work is
  ``(x - m) * a + b``, with ``m`` the rounded mean (``x - m`` is exact near ``m``) and the
  rounding residual of the mean folded into ``b``. Otherwise (layer norm) the output is
  computed as :meth:`Moments.standardize` and then :func:`affine`.
  """
  xf = x.astype(moments.var.dtype)
  kept = all(moments.var.shape[a] == x.shape[a] for a in feature_axes)
  if not kept:
    yf = moments.standardize(xf, epsilon)
    if gain is not None:
      yf = yf * gain
    if offset is not None:
      yf = yf + offset
    return affine(yf, x, scale, bias, feature_axes, dtype)
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
  params = [p for p in (scale, bias) if p is not None]
  rounded_mean = moments.shift + moments.mean
  residual = (moments.shift - rounded_mean) + moments.mean
  multiplier = lax.rsqrt(moments.var + epsilon)
  if gain is not None:
    multiplier = multiplier * gain
  addend = offset if offset is not None else jnp.zeros((), xf.dtype)
  if scale is not None:
    multiplier = multiplier * scale
    addend = addend * scale
  addend = addend - residual * multiplier
  if bias is not None:
    addend = addend + bias
  per_channel = (moments.shift, moments.mean, multiplier, addend)
  per_channel = lax.platform_dependent(
      *per_channel, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a)
  yf = _shift_and_scale(xf, *per_channel)
  return yf.astype(dtype or jnp.result_type(x.dtype, *(p.dtype for p in params)))


@jax.custom_jvp
def _shift_and_scale(xf: Array, shift: Array, mean: Array, multiplier: Array,
                     addend: Array) -> Array:
  """``(x - (shift + mean)) * multiplier + addend``, all but ``x`` per channel.

  Its derivative keeps the per-channel terms per channel, ``(d addend - d mean * multiplier)``,
  so that the gradient of the mean is ``multiplier`` times the sum of the output's cotangent
  (the bias's gradient) rather than the sum of a full-size product that XLA would write to
  memory to share with the input's gradient; and it spells ``x`` minus the mean as
  ``(x - shift) - mean``, an expression of its own that XLA does not share (and write to
  memory) with the output's nor the moments' derivative. Batch norm training step on
  32x56x56x128: 3.25 times the minimum planned bytes before, 3.0 after.
  """
  return (xf - (shift + mean)) * multiplier + addend


@_shift_and_scale.defjvp
def _shift_and_scale_jvp(primals, tangents):
  xf, shift, mean, multiplier, addend = primals
  dx, d_shift, d_mean, d_multiplier, d_addend = tangents
  y = _shift_and_scale(xf, shift, mean, multiplier, addend)
  dy = (dx * multiplier + ((xf - shift) - mean) * d_multiplier
        + (d_addend - (d_shift + d_mean) * multiplier))
  return y, dy


def _scaled(xf: Array, moments: stats.Moments, scale: Array | None, bias: Array | None,
            epsilon: float) -> tuple[Array, Array]:
  """``xhat * scale + bias`` and the normalized input ``xhat`` (:meth:`Moments.standardize`)."""
  xhat = moments.standardize(xf, epsilon)
  yf = xhat if scale is None else xhat * scale
  return (yf if bias is None else yf + bias), xhat


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _normalize_local(xf: Array, where: Array | None, scale: Array | None, bias: Array | None,
                     axes: tuple[int, ...], epsilon: float,
                     fused: bool = False) -> tuple[Array, stats.Moments]:
  """This device's moments of ``xf`` over ``axes``, and ``xf`` normalized, scaled and shifted.

  Its derivative is written in closed form (Ioffe and Szegedy 2015): with :math:`\\hat x` the
  normalized input, :math:`n` the count and :math:`w` the mask, over the reduced axes,

  .. math:: d\\hat x = \\frac{1}{\\sigma}\\Big(dx - \\frac{1}{n}\\textstyle\\sum w\\, dx
     - \\frac{\\hat x}{n} \\sum w\\, \\hat x\\, dx\\Big).

  Transposed for a gradient, that is two sums over the reduced axes and one pass; derived
  through the shifted sums, the gradient plans more bytes (layer norm 8192x1024: 3.75 times
  the minimum instead of 4.0).

  With ``fused`` (unmasked, trailing ``axes``, for XLA's CPU backend: see
  :func:`_fuses_rows`), the moments are :func:`stats.fused_row_moments`, which XLA computes
  inside the kernel that writes the output, and the gradient is three fused passes: the input's
  (reading ``x`` and the cotangent once, its sums over each row in cache), ``scale``'s and
  ``bias``'s. Layer norm 8192x1024, planned bytes over the minimum: forward 1.0 instead of 3.0,
  training step 1.5 instead of 3.5 (times the memory pass: 1.6 instead of 1.7, 2.4 instead
  of 3.3).
  """
  moments = _moments_of(xf, where, axes, fused)
  return _scaled(xf, moments, scale, bias, epsilon)[0], moments


def _moments_of(xf: Array, where: Array | None, axes: tuple[int, ...],
                fused: bool) -> stats.Moments:
  """The moments :func:`_normalize_local` normalizes with (``fused``: the CPU kernel's)."""
  if fused:
    return stats.fused_row_moments(xf, axes)
  return stats.local_moments(xf, axes, where=where)


@_normalize_local.defjvp
def _normalize_local_jvp(axes, epsilon, fused, primals, tangents):
  xf, where, scale, bias = primals
  dx, _, d_scale, d_bias = tangents
  moments = _moments_of(xf, where, axes, fused)
  yf, xhat = _scaled(xf, moments, scale, bias, epsilon)
  rstd = lax.rsqrt(moments.var + epsilon)
  d_xhat, d_mean, d_spread = _standardize_tangent(xf, where, dx, axes, epsilon, fused, moments)
  dy = d_xhat
  if scale is not None:
    xhat_for_scale = xhat
    if fused:
      # x through a barrier: scale's gradient, a sum over the rows, then recomputes xhat in a
      # fused pass of its own, rather than share one that XLA would write to memory
      x_again = lax.optimization_barrier(xf)
      xhat_for_scale = _scaled(x_again, stats.fused_row_moments(x_again, axes), None, None,
                               epsilon)[1]
    # (scale through a barrier too, for the same reason: its broadcast would be shared)
    dy = dy * (lax.optimization_barrier(scale) if fused else scale) + xhat_for_scale * d_scale
  if bias is not None:
    dy = dy + d_bias
  d_moments = stats.Moments(jnp.zeros_like(moments.count), jnp.zeros_like(moments.shift),
                            d_mean, 2 * d_spread / rstd)
  return (yf, moments), (dy, d_moments)


def _standardize_tangent(xf: Array, where: Array | None, dx: Array, axes: tuple[int, ...],
                         epsilon: float, fused: bool, moments: stats.Moments):
  """The tangent of the standardized input, and those of its mean and half its variance.

  With ``fused``, from moments recomputed on ``x`` through a barrier: the input's gradient is
  then one fused pass over ``x`` and the cotangent, which shares nothing full-size with the
  forward output's pass.
  """
  if fused:
    xf, _ = lax.optimization_barrier((xf, moments.var))
    moments = stats.fused_row_moments(xf, axes)
  xhat = moments.standardize(xf, epsilon)
  inverse_count = stats._safe_divide(  # pylint: disable=protected-access
      jnp.ones_like(moments.count), moments.count)
  valid_dx = dx if where is None else jnp.where(where, dx, 0)
  d_mean = jnp.sum(valid_dx, axis=axes, keepdims=True) * inverse_count
  d_spread = jnp.sum(valid_dx * xhat, axis=axes, keepdims=True) * inverse_count
  return (dx - d_mean - xhat * d_spread) * lax.rsqrt(moments.var + epsilon), d_mean, d_spread


# From this many rows on, XLA's CPU backend compiles a whole row normalization (the reductions of
# stats.fused_row_moments and the output) into one kernel that reads each row from memory once;
# below, into several, where the plain sums of stats.local_moments are faster.
_FUSED_ROWS = 4096


def _fuses_rows(shape: tuple[int, ...], where: Array | None, axes: tuple[int, ...]) -> bool:
  """Whether XLA's CPU backend fuses the normalization over ``axes`` into one kernel.

  Symbolic dimensions (shape-polymorphic export) take the general formulas.
  """
  if not all(isinstance(n, int) for n in shape):
    return False
  rows = math.prod(shape[:len(shape) - len(axes)])
  trailing = axes == tuple(range(len(shape) - len(axes), len(shape)))
  return where is None and trailing and rows >= _FUSED_ROWS


def normalize_over(x: Array, axes: tuple[int, ...], scale: ArrayLike | None,
                   bias: ArrayLike | None, *, feature_axes: tuple[int, ...], epsilon: float,
                   where: ArrayLike | None, axis_name: AxisName | None, axis_index_groups: Groups,
                   dtype: Any, group_size: int | None = None) -> tuple[Array, stats.Moments]:
  """Normalizes ``x`` with the moments of its valid elements over ``axes``, then scales it.

  Returns the output of :func:`normalize_moments` and the moments (of
  :func:`stats.reduce_moments`, or with ``group_size`` of :func:`stats.group_moments`).
  Where the parameters vary along reduced axes (layer norm) on one device (no ``axis_name``,
  no Explicit sharding of ``axes``), the statistics and the output are differentiated together
  in closed form (:func:`_normalize_local`). Otherwise (per-channel parameters, or statistics
  pooled over devices) :func:`normalize_moments` folds the parameters and the statistics are
  differentiated as they are computed: for per-channel parameters the gradient then shares its
  two sums with the parameters' (3.25 times the minimum bytes for batch norm, the closed form
  4.25).
  """
  per_channel = all(x.shape[a] == 1 or a not in axes or (group_size and a == x.ndim - 1)
                    for a in feature_axes)
  if (per_channel or group_size is not None or axis_name is not None
      or stats._explicit_shards(x, axes) is not None):  # pylint: disable=protected-access
    if group_size is None:
      moments = stats.reduce_moments(x, axes, where=where, axis_name=axis_name,
                                     axis_index_groups=axis_index_groups)
    else:
      moments = stats.group_moments(x, axes, group_size, where=where, axis_name=axis_name,
                                    axis_index_groups=axis_index_groups)
    y = normalize_moments(x, moments, scale, bias, feature_axes=feature_axes, epsilon=epsilon,
                          dtype=dtype)
    return y, moments
  xf = x.astype(checks.reduction_dtype(x.dtype))
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
  params = [p for p in (scale, bias) if p is not None]
  scale, bias = (_inexact(p, xf.dtype) for p in (scale, bias))
  where = checks.broadcast_mask(where, x.shape)
  if _fuses_rows(x.shape, where, axes):
    yf, moments = lax.platform_dependent(
        cpu=lambda: _normalize_local(xf, None, scale, bias, axes, epsilon, True),
        default=lambda: _normalize_local(xf, None, scale, bias, axes, epsilon))
  else:
    yf, moments = _normalize_local(xf, where, scale, bias, axes, epsilon)
  return yf.astype(dtype or jnp.result_type(x.dtype, *(p.dtype for p in params))), moments


def normalize(x: ArrayLike, mean: ArrayLike, var: ArrayLike, scale: ArrayLike | None = None,
              bias: ArrayLike | None = None, *, feature_axes: Axes = -1, epsilon: float = 1e-5,
              dtype: Any = None) -> Array:
  """Normalizes ``x`` with given statistics (evaluation-mode batch norm, frozen input stats).

  .. math:: y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\cdot \\gamma + \\beta

  Args:
    x: input array.
    mean, var: statistics with the shape of x's ``feature_axes``, or broadcastable to ``x``.
    scale, bias: optional :math:`\\gamma` and :math:`\\beta`, shaped like ``mean``.
    feature_axes: the axes the statistics and parameters vary along.
    epsilon: added to the variance.
    dtype: output dtype (default: result type of x, scale and bias).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.normalize(jnp.array([[1.0, 10.0], [3.0, 30.0]]), jnp.array([2.0, 20.0]),
    ...                   jnp.array([1.0, 100.0]), epsilon=0.0)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  x = checks.float_input(x, "normalize")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  mean = checks.feature_param(mean, x.shape, feature_axes, "mean")
  var = checks.feature_param(var, x.shape, feature_axes, "var")
  yf = (xf - mean) * lax.rsqrt(var.astype(xf.dtype) + epsilon)
  return affine(yf, x, scale, bias, feature_axes, dtype)


def layer_norm(x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None, *,
               reduction_axes: Axes = -1, feature_axes: Axes = -1, epsilon: float = 1e-6,
               where: ArrayLike | None = None, axis_name: AxisName | None = None,
               axis_index_groups: Groups = None, dtype: Any = None) -> Array:
  """Layer normalization (Ba, Kiros and Hinton 2016): statistics over each example's features.

  .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot \\gamma + \\beta

  with mean and variance over ``reduction_axes`` (and over devices with ``axis_name``), the valid
  elements only when ``where`` is given.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.layer_norm(jnp.array([[1e4 + 1.0, 1e4 - 1.0]]), epsilon=0.0)
    Array([[ 1., -1.]], dtype=float32)
  """
  x = checks.float_input(x, "layer_norm")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  reduction_axes = checks.canonical_axes(reduction_axes, x.ndim, shape=x.shape)
  return normalize_over(x, reduction_axes, scale, bias, feature_axes=feature_axes,
                        epsilon=epsilon, where=where, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, dtype=dtype)[0]


def rms_norm(x: ArrayLike, scale: ArrayLike | None = None, *, reduction_axes: Axes = -1,
             feature_axes: Axes = -1, epsilon: float = 1e-6, where: ArrayLike | None = None,
             axis_name: AxisName | None = None, axis_index_groups: Groups = None,
             dtype: Any = None) -> Array:
  """Root mean square normalization (Zhang and Sennrich 2019).

  .. math:: y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}} \\cdot \\gamma

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.rms_norm(jnp.array([[3.0, -3.0]]), epsilon=0.0)
    Array([[ 1., -1.]], dtype=float32)
  """
  x = checks.float_input(x, "rms_norm")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  axes = checks.canonical_axes(reduction_axes, x.ndim, shape=x.shape)
  sharded = stats._explicit_shards(x, axes) is not None  # pylint: disable=protected-access
  if axis_name is not None or sharded:
    ms = stats.mean_square(x, axes, where=where, axis_name=axis_name,
                           axis_index_groups=axis_index_groups)
    yf = x.astype(ms.dtype) * lax.rsqrt(ms + epsilon)
    return affine(yf, x, scale, None, feature_axes, dtype)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  where = checks.broadcast_mask(where, x.shape)
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  dtype = dtype or jnp.result_type(x.dtype, *([] if scale is None else [scale.dtype]))
  scale = _inexact(scale, xf.dtype)
  if _fuses_rows(x.shape, where, axes):
    yf = lax.platform_dependent(cpu=lambda: _rms_local(xf, None, scale, axes, epsilon, True),
                                default=lambda: _rms_local(xf, None, scale, axes, epsilon))
  else:
    yf = _rms_local(xf, where, scale, axes, epsilon)
  return yf.astype(dtype)


def _inexact(param: Array | None, dtype: Any) -> Array | None:
  """An integer or boolean parameter as ``dtype`` (the closed-form derivatives need floats)."""
  if param is None or jnp.issubdtype(param.dtype, jnp.inexact):
    return param
  return param.astype(dtype)


def _rms_standardized(xf: Array, where: Array | None, axes: tuple[int, ...],
                      epsilon: float) -> tuple[Array, Array, Array]:
  """``x / sqrt(mean(x**2) + epsilon)`` over the valid elements, its inverse rms and count."""
  inverse_rms = lax.rsqrt(stats.mean_square(xf, axes, where=where) + epsilon)
  return xf * inverse_rms, inverse_rms, stats.valid_count(xf.shape, where, axes, xf.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _rms_local(xf: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
               epsilon: float, fused: bool = False) -> Array:
  """``x / sqrt(mean(x**2) + epsilon) * scale`` with this device's mean over ``axes``.

  Its derivative is written in closed form: with :math:`\\hat x = x / r` and :math:`w` the
  mask, over the reduced axes,

  .. math:: d\\hat x = \\frac{1}{r}\\Big(dx - \\frac{\\hat x}{n}\\textstyle\\sum w\\,
     \\hat x\\, dx\\Big).

  With ``fused`` (see :func:`_normalize_local`), the input's and ``scale``'s gradients each
  recompute :math:`\\hat x` in a fused pass of their own: RMS norm 8192x1024 training step
  1.25 times the minimum planned bytes instead of 3.25.
  """
  xhat = _rms_standardized(xf, where, axes, epsilon)[0]
  return xhat if scale is None else xhat * scale


@_rms_local.defjvp
def _rms_local_jvp(axes, epsilon, fused, primals, tangents):
  xf, where, scale = primals
  dx, _, d_scale = tangents
  xhat = _rms_standardized(xf, where, axes, epsilon)[0]
  yf = xhat if scale is None else xhat * scale
  x_in = lax.optimization_barrier((xf, scale))[0] if fused else xf
  xhat_in, inverse_rms, count = _rms_standardized(x_in, where, axes, epsilon)
  valid_dx = dx if where is None else jnp.where(where, dx, 0)
  d_spread = stats._safe_divide(  # pylint: disable=protected-access
      jnp.sum(valid_dx * xhat_in, axis=axes, keepdims=True), count)
  dy = (dx - xhat_in * d_spread) * inverse_rms
  if scale is not None:
    if fused:  # barriers as in _normalize_local_jvp
      xhat = _rms_standardized(lax.optimization_barrier(xf), None, axes, epsilon)[0]
    dy = dy * (lax.optimization_barrier(scale) if fused else scale) + xhat * d_scale
  return yf, dy


def num_groups_for(channels: int, num_groups: int | None, group_size: int | None,
                   shape: tuple[int, ...]) -> int:
  """The number of groups from exactly one of ``num_groups`` and ``group_size``."""
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"give exactly one of num_groups={num_groups} and group_size={group_size}; to set "
        f"group_size, pass num_groups=None")
  if group_size is not None:
    if group_size <= 0 or channels % group_size:
      raise ValueError(
          f"group_size={group_size} must divide the {channels} channels of x.shape={shape}; "
          f"pick a divisor of {channels}")
    return channels // group_size
  if num_groups <= 0 or channels % num_groups:
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    raise ValueError(
        f"num_groups={num_groups} must divide the {channels} channels of x.shape={shape}; "
        f"pick a divisor of {channels} ({', '.join(map(str, divisors))}) or set group_size")
  return num_groups


def group_norm(x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None, *,
               num_groups: int | None = None, group_size: int | None = None,
               epsilon: float = 1e-6, reduction_axes: Axes | None = None,
               where: ArrayLike | None = None, axis_name: AxisName | None = None,
               axis_index_groups: Groups = None, dtype: Any = None) -> Array:
  """Group normalization (Wu and He 2018), channels last.

  The C channels are split into ``num_groups`` groups of ``C / num_groups`` consecutive
  channels; each example is normalized with the mean and variance of each group over
  ``reduction_axes`` (by default every axis but the first, the batch), then scaled per channel.

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)}
     + \\epsilon}} \\cdot \\gamma_c + \\beta_c

  A mask may broadcast (for example shape ``(N, H, W, 1)``).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> jaxnorm.group_norm(x, num_groups=2, epsilon=0.0)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  x = checks.float_input(x, "group_norm")
  if reduction_axes is None:
    reduction_axes = tuple(range(1, x.ndim - 1)) + (x.ndim - 1,)
  reduction_axes = checks.canonical_axes(reduction_axes, x.ndim, name="reduction_axes",
                                         shape=x.shape)
  if reduction_axes[-1] != x.ndim - 1:
    raise ValueError(
        f"reduction_axes={reduction_axes} must include the last axis, the channels of "
        f"x.shape={x.shape}; group_norm is channels-last")
  channels = x.shape[-1]
  groups = num_groups_for(channels, num_groups, group_size, x.shape)
  return normalize_over(x, reduction_axes, scale, bias, feature_axes=(x.ndim - 1,),
                        epsilon=epsilon, where=where, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, dtype=dtype,
                        group_size=channels // groups)[0]


def instance_norm(x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None,
                  *, feature_axes: Axes = -1, epsilon: float = 1e-6,
                  where: ArrayLike | None = None, axis_name: AxisName | None = None,
                  axis_index_groups: Groups = None, dtype: Any = None) -> Array:
  """Instance normalization (Ulyanov, Vedaldi and Lempitsky 2016).

  Each example and channel is normalized over the remaining axes (all but the first, the batch,
  and the ``feature_axes``): group normalization with one channel per group.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])
    >>> jaxnorm.instance_norm(x, epsilon=0.0)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """
  x = checks.float_input(x, "instance_norm")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  if 0 in feature_axes:
    raise ValueError(
        f"feature_axes={feature_axes} includes axis 0, the batch axis of x.shape={x.shape}; "
        f"instance_norm keeps axis 0 as the batch: move the batch first")
  reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
  if not reduction_axes:
    raise ValueError(
        f"instance_norm of x.shape={x.shape} with feature_axes={feature_axes} has no axis to "
        f"reduce; give x spatial axes, e.g. (batch, length, channels)")
  return normalize_over(x, reduction_axes, scale, bias, feature_axes=feature_axes,
                        epsilon=epsilon, where=where, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, dtype=dtype)[0]
