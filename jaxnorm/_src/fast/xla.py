"""Fast paths for XLA: the same values as the reference path, in fewer passes over memory.

Each function here replaces one dispatched operation of the reference modules
(:mod:`jaxnorm._src.dispatch`) and takes its arguments. They exist because
``benchmarks/speed.py`` shows them paying on XLA (most of all on its CPU backend); each is
tested equal to the reference in values and gradients (``tests/test_fast_paths.py``).

- ``moment_sums``: plain sums of ``x`` and ``x**2`` where every mean is near 0 (XLA reduces
  them fastest), the shifted pass only where needed, decided at run time; a derivative that
  shares nothing full-size with the forward sums.
- ``shift_and_scale``: the per-channel multiplier and addend computed once (an optimization
  barrier on CPU; XLA otherwise redoes that arithmetic for every element), and a derivative that
  keeps per-channel terms per channel.
- ``normalize_rows`` and ``rms_rows`` (layer and RMS norm on one device): statistics and
  output differentiated together in closed form; on CPU from 4096 rows, the corrected two-pass
  moments and barriers that let XLA's CPU backend compile each pass into one kernel that reads
  a row from memory once.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax

from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import normalize as normalize_lib
from jaxnorm._src.moments import Moments, reduce_sum, safe_divide

# The plain sums are used where every mean is within 4 standard deviations of 0: there
# E[x^2] - E[x]^2 loses at most a factor 17 of the sums' own rounding, about what a shift by one
# sample loses (its distance to the mean is a standard deviation or more).
NEAR_ZERO = 16.0

# From this many rows on, XLA's CPU backend compiles a whole row normalization (the reductions of
# fused_row_moments and the output) into one kernel that reads each row from memory once; below,
# into several, where the plain sums of moment_sums are faster.
FUSED_ROWS = 4096


def moment_sums(xf: Array, count: Array, where: Array | None, axes: tuple[int, ...],
                group_size: int | None) -> tuple[Array, Array, Array]:
  """The shift and the sums of ``x - shift`` and of its square (:func:`moments.moment_sums`).

  Complex input takes the reference path (no fast path of this module is written for it).
  """
  if jnp.iscomplexobj(xf):
    return moments_lib.moment_sums(xf, count, where, axes, group_size)
  return _moment_sums(xf, count, where, axes, group_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _moment_sums(xf: Array, count: Array, where: Array | None, axes: tuple[int, ...],
                 group_size: int | None) -> tuple[Array, Array, Array]:
  """The real path of :func:`moment_sums`.

  First the plain sums of ``x`` and ``x**2`` (shift 0). Only where some mean is farther than 4
  standard deviations from 0 (or a sum is not finite), a second pass takes the data's shift, at
  run time (``lax.cond``; under ``vmap`` both run).
  """
  valid = xf if where is None else jnp.where(where, xf, 0)
  total = reduce_sum(valid, axes, group_size)
  total_sq = reduce_sum(valid * valid, axes, group_size)
  mean = safe_divide(total, count)
  spread = safe_divide(total_sq, count) - mean * mean
  near_zero = (mean * mean <= NEAR_ZERO * spread) | (count == 0)

  def shifted():
    # The plain sums still where the mean is near 0: each channel's statistics then do not
    # depend on the other channels' (under vmap each example decides alone).
    shift = jnp.where(near_zero, 0, moments_lib.data_shift(xf, axes, where, count, group_size))
    # The same values spelled twice: XLA would otherwise share one full-size ``x - shift``
    # between the two sums and write it to memory. Spelled apart, each sum reads x once.
    centred, centred_again = xf - shift, xf + (-shift)
    if where is not None:
      centred, centred_again = jnp.where(where, centred, 0), jnp.where(where, centred_again, 0)
    return (shift,
            jnp.where(near_zero, total, reduce_sum(centred_again, axes, group_size)),
            jnp.where(near_zero, total_sq, reduce_sum(centred * centred, axes, group_size)))

  return lax.cond(jnp.all(near_zero), lambda: (jnp.zeros_like(total), total, total_sq), shifted)


@_moment_sums.defjvp
def _moment_sums_jvp(axes, group_size, primals, tangents):
  """d(sum of c) = sum of dc, d(sum of c^2) = sum of 2c dc; count and shift get none.

  c = x - shift is computed as (x - m) + (m - shift) around the rounded mean m: the same values,
  but nothing in common with the forward sums, which XLA would otherwise write to memory.
  """
  xf, count, where = primals
  dx = tangents[0]
  shift, total, total_sq = _moment_sums(xf, count, where, axes, group_size)
  rounded_mean = shift + safe_divide(total, count)
  centred = (xf + (-rounded_mean)) + (rounded_mean - shift)
  dc = dx if where is None else jnp.where(where, dx, 0)
  d_total = reduce_sum(dc, axes, group_size)
  d_total_sq = reduce_sum(2 * centred * dc, axes, group_size)
  return (shift, total, total_sq), (jnp.zeros_like(shift), d_total, d_total_sq)


def shift_and_scale(xf: Array, shift: Array, residual: Array, multiplier: Array,
                    addend: Array) -> Array:
  """:func:`normalize.shift_and_scale` with its per-channel inputs computed once on CPU."""
  if jnp.iscomplexobj(xf):
    return normalize_lib.shift_and_scale(xf, shift, residual, multiplier, addend)
  per_channel = lax.platform_dependent(
      shift, residual, multiplier, addend,
      cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a)
  return _shift_and_scale(xf, *per_channel)


@jax.custom_jvp
def _shift_and_scale(xf: Array, shift: Array, residual: Array, multiplier: Array,
                     addend: Array) -> Array:
  """``(x - (shift + residual)) * multiplier + addend``.

  Its derivative keeps the per-channel terms per channel, ``(d addend - d mean * multiplier)``,
  so the mean's gradient is ``multiplier`` times the sum of the output's cotangent rather than
  the sum of a full-size product that XLA would write to memory; and it spells ``x`` minus the
  mean as ``(x - shift) - residual``, an expression XLA does not share with others.
  """
  return (xf - (shift + residual)) * multiplier + addend


@_shift_and_scale.defjvp
def _shift_and_scale_jvp(primals, tangents):
  xf, shift, residual, multiplier, addend = primals
  dx, d_shift, d_residual, d_multiplier, d_addend = tangents
  y = _shift_and_scale(xf, shift, residual, multiplier, addend)
  dy = (dx * multiplier + ((xf - shift) - residual) * d_multiplier
        + (d_addend - (d_shift + d_residual) * multiplier))
  return y, dy


def fuses_rows(shape: tuple[int, ...], where: Array | None, axes: tuple[int, ...]) -> bool:
  """Whether XLA's CPU backend fuses the normalization over ``axes`` into one kernel.

  Unmasked, over trailing axes, from :data:`FUSED_ROWS` rows. Symbolic dimensions
  (shape-polymorphic export) take the general formulas.
  """
  if not all(isinstance(n, int) for n in shape):
    return False
  rows = math.prod(shape[:len(shape) - len(axes)])
  trailing = axes == tuple(range(len(shape) - len(axes), len(shape)))
  return where is None and trailing and rows >= FUSED_ROWS


def fused_row_moments(xf: Array, axes: tuple[int, ...]) -> Moments:
  """Unmasked moments over ``axes`` by the corrected two-pass formula.

  .. math:: m = \\frac{1}{n}\\sum_i x_i, \\quad r = \\frac{1}{n}\\sum_i (x_i - m), \\quad
     \\sigma^2 = \\frac{1}{n}\\sum_i \\big((x_i - m) - r\\big)^2

  (Chan, Golub and LeVeque 1983), returned with shift ``m`` (no gradient) and residual ``r``.
  As accurate as the shifted sums at any offset, with no run-time branch: over trailing axes,
  XLA's CPU backend fuses the three reductions with the output into one kernel. With nothing to
  reduce, the moments are 0.
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


def _inexact(param: Array | None, dtype: Any) -> Array | None:
  """An integer or boolean parameter as ``dtype`` (the closed-form derivatives need floats)."""
  if param is None or jnp.issubdtype(param.dtype, jnp.inexact):
    return param
  return param.astype(dtype)


def normalize_rows(x: Array, where: Array | None, scale: Array | None, bias: Array | None,
                   axes: tuple[int, ...], epsilon: float, *,
                   out_dtype: Any = None) -> tuple[Array, Moments]:
  """:func:`normalize.normalize_rows`, differentiated in closed form; fused rows on CPU.

  ``x`` is widened here (``astype``: XLA fuses the conversion into the passes that read it).
  """
  if jnp.iscomplexobj(x):
    return normalize_lib.normalize_rows(x, where, scale, bias, axes, epsilon,
                                        out_dtype=out_dtype)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  scale, bias = _inexact(scale, xf.dtype), _inexact(bias, xf.dtype)
  if fuses_rows(xf.shape, where, axes):
    yf, moments = lax.platform_dependent(
        cpu=lambda: _normalize_local(xf, None, scale, bias, axes, epsilon, True),
        default=lambda: _normalize_local(xf, None, scale, bias, axes, epsilon))
  else:
    yf, moments = _normalize_local(xf, where, scale, bias, axes, epsilon)
  return yf.astype(out_dtype or xf.dtype), moments


def _row_moments(xf: Array, where: Array | None, axes: tuple[int, ...], fused: bool) -> Moments:
  return fused_row_moments(xf, axes) if fused else moments_lib.local_moments(xf, axes, where)


def _scaled(xf, moments, scale, bias, epsilon):
  """``xhat * scale + bias`` and ``xhat``."""
  xhat = moments.standardize(xf, epsilon)
  yf = xhat if scale is None else xhat * scale
  return (yf if bias is None else yf + bias), xhat


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _normalize_local(xf: Array, where: Array | None, scale: Array | None, bias: Array | None,
                     axes: tuple[int, ...], epsilon: float,
                     fused: bool = False) -> tuple[Array, Moments]:
  """The moments over ``axes`` and ``x`` normalized, scaled and shifted.

  Its derivative is written in closed form (Ioffe and Szegedy 2015): with :math:`\\hat x` the
  normalized input, :math:`n` the count and :math:`w` the mask, over the reduced axes,

  .. math:: d\\hat x = \\frac{1}{\\sigma}\\Big(dx - \\frac{1}{n}\\textstyle\\sum w\\, dx
     - \\frac{\\hat x}{n} \\sum w\\, \\hat x\\, dx\\Big).

  With ``fused``, the input's gradient, ``scale``'s and ``bias``'s are each one fused pass:
  ``x`` goes through barriers so that each recomputes :math:`\\hat x` in cache rather than
  share one that XLA would write to memory.
  """
  moments = _row_moments(xf, where, axes, fused)
  return _scaled(xf, moments, scale, bias, epsilon)[0], moments


@_normalize_local.defjvp
def _normalize_local_jvp(axes, epsilon, fused, primals, tangents):
  xf, where, scale, bias = primals
  dx, _, d_scale, d_bias = tangents
  moments = _row_moments(xf, where, axes, fused)
  yf, xhat = _scaled(xf, moments, scale, bias, epsilon)
  rstd = lax.rsqrt(moments.var + epsilon)
  x_in, tangent_moments = xf, moments
  if fused:
    x_in, _ = lax.optimization_barrier((xf, moments.var))
    tangent_moments = fused_row_moments(x_in, axes)
  xhat_in = tangent_moments.standardize(x_in, epsilon)
  inverse_count = safe_divide(jnp.ones_like(moments.count), moments.count)
  valid_dx = dx if where is None else jnp.where(where, dx, 0)
  d_mean = jnp.sum(valid_dx, axis=axes, keepdims=True) * inverse_count
  d_spread = jnp.sum(valid_dx * xhat_in, axis=axes, keepdims=True) * inverse_count
  dy = (dx - d_mean - xhat_in * d_spread) * lax.rsqrt(tangent_moments.var + epsilon)
  if scale is not None:
    xhat_for_scale = xhat
    if fused:
      x_again = lax.optimization_barrier(xf)
      xhat_for_scale = _scaled(x_again, fused_row_moments(x_again, axes), None, None,
                               epsilon)[1]
    dy = dy * (lax.optimization_barrier(scale) if fused else scale) + xhat_for_scale * d_scale
  if bias is not None:
    dy = dy + d_bias
  d_moments = Moments(jnp.zeros_like(moments.count), jnp.zeros_like(moments.shift),
                      d_mean, 2 * d_spread / rstd)
  return (yf, moments), (dy, d_moments)


def rms_rows(x: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
             epsilon: float, *, out_dtype: Any = None) -> Array:
  """:func:`normalize.rms_rows`, differentiated in closed form; fused rows on CPU; ``x``
  widened here, as in :func:`normalize_rows`."""
  if jnp.iscomplexobj(x):
    return normalize_lib.rms_rows(x, where, scale, axes, epsilon, out_dtype=out_dtype)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  scale = _inexact(scale, xf.dtype)
  if fuses_rows(xf.shape, where, axes):
    yf = lax.platform_dependent(cpu=lambda: _rms_local(xf, None, scale, axes, epsilon, True),
                                default=lambda: _rms_local(xf, None, scale, axes, epsilon))
  else:
    yf = _rms_local(xf, where, scale, axes, epsilon)
  return yf.astype(out_dtype or xf.dtype)


def _rms_standardized(xf, where, axes, epsilon):
  """``x / sqrt(mean(x**2) + epsilon)``, its inverse rms and the count."""
  inverse_rms = lax.rsqrt(moments_lib.mean_square(xf, axes, where) + epsilon)
  return xf * inverse_rms, inverse_rms, moments_lib.valid_count(xf.shape, where, axes, xf.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _rms_local(xf: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
               epsilon: float, fused: bool = False) -> Array:
  """``x / sqrt(mean(x**2) + epsilon) * scale``, differentiated in closed form.

  .. math:: d\\hat x = \\frac{1}{r}\\Big(dx - \\frac{\\hat x}{n}\\textstyle\\sum w\\,
     \\hat x\\, dx\\Big), \\qquad \\hat x = x / r.
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
  d_spread = safe_divide(jnp.sum(valid_dx * xhat_in, axis=axes, keepdims=True), count)
  dy = (dx - xhat_in * d_spread) * inverse_rms
  if scale is not None:
    if fused:  # barriers as in _normalize_local_jvp
      xhat = _rms_standardized(lax.optimization_barrier(xf), None, axes, epsilon)[0]
    dy = dy * (lax.optimization_barrier(scale) if fused else scale) + xhat * d_scale
  return yf, dy


def add_normalize_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                       bias: Array | None, axes: tuple[int, ...], epsilon: float, *,
                       residual_dtype: Any, out_dtype: Any) -> tuple[Array, Array]:
  """:func:`normalize.add_normalize_rows` with :func:`normalize_rows` (XLA fuses the add into
  the norm's passes)."""
  h = normalize_lib.residual_add(x, residual, residual_dtype)
  return normalize_rows(h, where, scale, bias, axes, epsilon, out_dtype=out_dtype)[0], h


def add_rms_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                 axes: tuple[int, ...], epsilon: float, *, residual_dtype: Any,
                 out_dtype: Any) -> tuple[Array, Array]:
  """:func:`normalize.add_rms_rows` with :func:`rms_rows`."""
  h = normalize_lib.residual_add(x, residual, residual_dtype)
  return rms_rows(h, where, scale, axes, epsilon, out_dtype=out_dtype), h
