"""The output of every normalization: ``x`` standardized with given moments, then scaled.

The reference path:

.. math:: y = \\Big(\\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}\\, g + o\\Big)\\gamma + \\beta

with moments :math:`\\mu, \\sigma^2` (:class:`jaxnorm._src.moments.Moments`), batch renorm's
optional correction :math:`g, o` (``gain``, ``offset``), and the per-feature parameters
:math:`\\gamma, \\beta`. Where all of them vary only along axes the moments keep (batch, group
and instance norm, normalization with given statistics), they fold into one multiplier
:math:`a` and one addend :math:`b` per channel first, so that the full-size work is one pass,
``(x - m) * a + b`` (dispatched as ``"shift_and_scale"``). ``m`` is the rounded mean
``shift + residual``, so ``x - m`` is exact near the data, and the rounding error of ``m`` is
folded into ``b``. Otherwise (layer norm) the moments standardize ``x`` and the parameters
follow.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import dispatch
from jaxnorm._src.moments import Moments, local_moments, mean_square


def output_dtype(x: Array, *params: Array | None, dtype: Any = None) -> Any:
  """``dtype``, or the result type of ``x`` and the parameters given (as Flax)."""
  return dtype or jnp.result_type(x.dtype, *(p.dtype for p in params if p is not None))


def shift_and_scale(xf: Array, shift: Array, residual: Array, multiplier: Array,
                    addend: Array) -> Array:
  """``(x - (shift + residual)) * multiplier + addend``, all but ``x`` per channel."""
  return (xf - (shift + residual)) * multiplier + addend


def fold(moments: Moments, scale: Array | None, bias: Array | None, *, epsilon: float,
         gain: Array | None = None, offset: Array | None = None) -> tuple[Array, Array]:
  """The per-channel multiplier and addend of :func:`normalize_with`'s folded form.

  ``a = g * gamma / sqrt(var + epsilon)`` and ``b = o * gamma - r * a + beta``, where
  ``r = (shift - m) + residual`` is what rounding left out of ``m = shift + residual``.
  """
  rounded_mean = moments.shift + moments.residual
  rounding = (moments.shift - rounded_mean) + moments.residual
  multiplier = lax.rsqrt(moments.var + epsilon)
  if gain is not None:
    multiplier = multiplier * gain
  addend = offset if offset is not None else jnp.zeros((), moments.var.dtype)
  if scale is not None:
    multiplier = multiplier * scale
    addend = addend * scale
  addend = addend - rounding * multiplier
  if bias is not None:
    addend = addend + bias
  return multiplier, addend


def given_moments(mean: ArrayLike, var: ArrayLike, x: Array,
                  feature_axes: tuple[int, ...]) -> Moments:
  """Moments from given statistics of the feature shape (or broadcasting against ``x``)."""
  dtype = checks.reduction_dtype(x.dtype)
  mean = checks.feature_param(mean, x.shape, feature_axes, "mean").astype(dtype)
  var = checks.feature_param(var, x.shape, feature_axes, "var").astype(checks.real_dtype(dtype))
  mean, var = (jnp.reshape(a, (1,) * x.ndim) if a.ndim == 0 else a for a in (mean, var))
  return Moments(jnp.ones_like(var), mean, jnp.zeros_like(mean), var)


def normalize_with(x: Array, moments: Moments, scale: ArrayLike | None = None,
                   bias: ArrayLike | None = None, *, feature_axes: tuple[int, ...],
                   epsilon: float, dtype: Any = None, gain: Array | None = None,
                   offset: Array | None = None) -> Array:
  """``x`` normalized with ``moments`` (broadcasting against ``x``), then scaled and shifted.

  ``scale`` and ``bias`` have the shape of x's ``feature_axes`` (or broadcast against ``x``);
  ``gain`` and ``offset`` broadcast against the moments. The result is in ``dtype``, by
  default the result type of ``x``, ``scale`` and ``bias``.
  """
  xf = x.astype(jnp.result_type(moments.shift, moments.var))
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
  out_dtype = output_dtype(x, scale, bias, dtype=dtype)
  if all(moments.var.shape[a] == x.shape[a] for a in feature_axes):
    multiplier, addend = fold(moments, scale, bias, epsilon=epsilon, gain=gain, offset=offset)
    step = dispatch.path("shift_and_scale", shift_and_scale)
    return step(xf, moments.shift, moments.residual, multiplier, addend).astype(out_dtype)
  yf = moments.standardize(xf, epsilon)
  if gain is not None:
    yf = yf * gain
  if offset is not None:
    yf = yf + offset
  if scale is not None:
    yf = yf * scale
  if bias is not None:
    yf = yf + bias
  return yf.astype(out_dtype)


def normalize_rows(x: Array, where: Array | None, scale: Array | None, bias: Array | None,
                   axes: tuple[int, ...], epsilon: float, *,
                   out_dtype: Any = None) -> tuple[Array, Moments]:
  """This device's moments over ``axes`` and ``x`` normalized with them, then scaled.

  For parameters that vary along the reduced axes (layer norm); dispatched as
  ``"normalize_rows"``, where the XLA path differentiates statistics and output together in
  closed form and the Pallas path runs a kernel. ``x`` comes in its own dtype and each path
  widens it (here with ``astype``, which XLA fuses; a kernel reads the narrow array itself).

  Args:
    x: the input, any float or complex dtype.
    where: optional mask of x's shape.
    scale, bias: optional parameters broadcasting against ``x``.
    axes: the reduced axes.
    epsilon: added to the variance.
    out_dtype: dtype of the output (default: the reduction dtype, at least float32).

  Returns:
    The output in ``out_dtype`` and the moments (in the reduction dtype).
  """
  xf = x.astype(checks.reduction_dtype(x.dtype))
  moments = local_moments(xf, axes, where)
  yf = moments.standardize(xf, epsilon)
  if scale is not None:
    yf = yf * scale
  if bias is not None:
    yf = yf + bias
  return yf.astype(out_dtype or xf.dtype), moments


def rms_rows(x: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
             epsilon: float, axis_name=None, axis_index_groups=None, *,
             out_dtype: Any = None) -> Array:
  """``x / sqrt(mean(x**2) + epsilon) * scale``, the mean over ``axes`` (and ``axis_name``).

  Dispatched as ``"rms_rows"`` on one device; ``x`` in its own dtype, widened here (as
  :func:`normalize_rows`), the result in ``out_dtype`` (default: the reduction dtype).
  """
  xf = x.astype(checks.reduction_dtype(x.dtype))
  yf = xf * lax.rsqrt(mean_square(xf, axes, where, axis_name, axis_index_groups) + epsilon)
  yf = yf if scale is None else yf * scale
  return yf.astype(out_dtype or xf.dtype)


def residual_add(x: Array, residual: Array, residual_dtype: Any) -> Array:
  """``h = x + residual`` in ``residual_dtype``, each rounded to it first."""
  return x.astype(residual_dtype) + residual.astype(residual_dtype)


def add_normalize_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                       bias: Array | None, axes: tuple[int, ...], epsilon: float, *,
                       residual_dtype: Any, out_dtype: Any) -> tuple[Array, Array]:
  """The fused residual add + layer norm on one device: ``(y, h)``, ``h = x + residual`` in
  ``residual_dtype`` and ``y`` the :func:`normalize_rows` of ``h`` in ``out_dtype``.

  Dispatched as ``"add_normalize_rows"`` (a Pallas kernel reads ``x`` and ``residual`` once and
  writes ``h`` and ``y``).
  """
  h = residual_add(x, residual, residual_dtype)
  return normalize_rows(h, where, scale, bias, axes, epsilon, out_dtype=out_dtype)[0], h


def add_rms_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                 axes: tuple[int, ...], epsilon: float, *, residual_dtype: Any,
                 out_dtype: Any) -> tuple[Array, Array]:
  """The fused residual add + RMS norm on one device, as :func:`add_normalize_rows`;
  dispatched as ``"add_rms_rows"``."""
  h = residual_add(x, residual, residual_dtype)
  return rms_rows(h, where, scale, axes, epsilon, out_dtype=out_dtype), h
