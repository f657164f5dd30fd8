"""Pallas kernels for layer and RMS norm over the last axis of a ``(rows, features)`` array.

Each program of the grid holds a block of whole rows and reduces each row where it sits (in
registers on a GPU, in VMEM on a TPU): layer norm by the corrected two-pass formula,

.. math:: m = \\frac{1}{n}\\sum_i x_i, \\quad r = \\frac{1}{n}\\sum_i (x_i - m), \\quad
   \\sigma^2 = \\frac{1}{n}\\sum_i \\big((x_i - m) - r\\big)^2

(Chan, Golub and LeVeque 1983; right at any distance from zero, for it reads memory once like
the fast one-pass formula), RMS norm by the mean square. Statistics are float32 whatever the
input dtype. The backward kernels recompute :math:`\\hat x` from ``x`` and the row statistics
and write ``dx``; the gradients of ``scale`` and ``bias`` (sums over rows) come out as one
partial sum per program, which XLA adds up.

One kernel body serves two layouts, :class:`Plan` says which:

- ``"triton"`` (GPU, Pallas-Triton): every array a power of two, so a block is
  ``next_power_of_2(features)`` wide, loads and stores are masked at the row and column
  edges, and the backward walks several row chunks per program to keep the partial sums small.
- ``"mosaic"`` (TPU): a block is the whole feature axis wide and a multiple of the sublane
  tile (8 rows of 32 bits) tall; Mosaic masks the edge blocks itself.

The block layouts are in :mod:`jaxnorm._src.fast.pallas_blocks`. Either runs anywhere in Pallas interpret mode (``interpret=True``), which is how the tests check
them on a CPU; on its own platform each lowers to one custom call (``__gpu$xla.gpu.triton`` or
``tpu_custom_call``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from jaxnorm._src.fast.pallas_blocks import Block
from jaxnorm._src.fast.pallas_blocks import F32
from jaxnorm._src.fast.pallas_blocks import Plan
from jaxnorm._src.fast.pallas_blocks import call
from jaxnorm._src.fast.pallas_blocks import chunks
from jaxnorm._src.fast.pallas_blocks import row_mean


# ---- layer norm ------------------------------------------------------------------------------

def residual_sum(block: Block, x_ref, residual_ref, h_ref, sum_dtype) -> Array:
  """``h = x + residual`` in ``sum_dtype`` (each rounded to it first, as XLA's
  ``x.astype(d) + residual.astype(d)``), stored to ``h_ref``; returned as float32."""
  total = (block.load(x_ref).astype(sum_dtype).astype(F32)
           + block.load(residual_ref).astype(sum_dtype).astype(F32)).astype(sum_dtype)
  block.store(h_ref, total)
  return total.astype(F32)


def layer_norm_fwd_kernel(*refs, plan: Plan, epsilon: float, has_scale: bool,
                          has_bias: bool, sum_dtype=None):
  """Layer norm of a block of rows; with ``sum_dtype``, of ``x + residual`` (a second input),
  also written out (a second output)."""
  x_ref, *refs = refs
  add_ref = refs.pop(0) if sum_dtype is not None else None
  scale_ref = refs.pop(0) if has_scale else None
  bias_ref = refs.pop(0) if has_bias else None
  y_ref, *refs = refs
  h_ref = refs.pop(0) if sum_dtype is not None else None
  shift_ref, residual_ref, var_ref = refs
  n = plan.features

  def body(block, carry):
    if sum_dtype is None:
      x = block.load(x_ref)
    else:
      x = residual_sum(block, x_ref, add_ref, h_ref, sum_dtype)
    shift = row_mean(x, n)
    centred = block.columns(x - shift)
    residual = row_mean(centred, n)
    deviation = block.columns(centred - residual)
    var = row_mean(deviation * deviation, n)
    y = deviation * lax.rsqrt(var + epsilon)
    if has_scale:
      y = y * block.load(scale_ref, "vector")
    if has_bias:
      y = y + block.load(bias_ref, "vector")
    block.store(y_ref, y)
    for ref, value in ((shift_ref, shift), (residual_ref, residual), (var_ref, var)):
      block.store(ref, value, "stat")
    return carry

  chunks(plan, False, body, 0)


def layer_norm_bwd_kernel(*refs, plan: Plan, epsilon: float, has_scale: bool,
                          has_bias: bool, has_dh: bool = False):
  """dx (plus the cotangent ``dh`` of a fused residual sum, where given) and the partial
  sums of d scale and d bias."""
  x_ref, *refs = refs
  scale_ref = refs.pop(0) if has_scale else None
  dy_ref, shift_ref, residual_ref, var_ref, d_residual_ref, d_var_ref, *refs = refs
  dh_ref = refs.pop(0) if has_dh else None
  dx_ref, *partial_refs = refs
  n = plan.features

  def body(block, sums):
    x, dy = block.load(x_ref), block.load(dy_ref)
    shift, residual, var = (block.load(r, "stat") for r in (shift_ref, residual_ref, var_ref))
    rstd = lax.rsqrt(var + epsilon)
    deviation = block.columns((x - shift) - residual)
    xhat = deviation * rstd
    g = dy * block.load(scale_ref, "vector") if has_scale else dy
    dx = rstd * (g - row_mean(g, n) - xhat * row_mean(g * xhat, n))
    # Cotangents of the returned statistics: d residual / dx = 1/n, d var / dx = 2 (x - mean)/n.
    dx = dx + (block.load(d_residual_ref, "stat")
               + 2.0 * block.load(d_var_ref, "stat") * deviation) * (1.0 / n)
    block.store(dx_ref, dx + block.load(dh_ref) if has_dh else dx)
    terms = ((dy * xhat,) if has_scale else ()) + ((dy,) if has_bias else ())
    return tuple(s + block.column_sum(t) for s, t in zip(sums, terms))

  sums = chunks(plan, True, body, tuple(jnp.zeros((1, plan.width), F32) for _ in partial_refs))
  for ref, total in zip(partial_refs, sums):
    Block(plan, 0, 0).store(ref, total, "partial")


class Spec(NamedTuple):
  """The static part of a kernel call: epsilon, output dtype and the plan."""
  epsilon: float
  out_dtype: Any
  plan: Plan


def as_vector(param: Array | None) -> Array | None:
  return None if param is None else param.reshape(1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_rows(x: Array, scale: Array | None, bias: Array | None,
                    spec: Spec) -> tuple[Array, Array, Array, Array]:
  """Layer norm of each row of a 2-D ``x``, by the kernel of ``spec.plan``.

  Args:
    x: ``(rows, features)``, any float dtype (statistics in float32).
    scale, bias: ``(features,)`` or ``None``.
    spec: epsilon, output dtype and plan (:func:`plan_for`).

  Returns:
    ``y`` in ``spec.out_dtype``, and per row (shape ``(rows, 1)``, float32) the shift
    :math:`m`, the residual :math:`r` (the mean is :math:`m + r`) and the variance.
  """
  return _layer_norm_fwd(x, scale, bias, spec)[0]


def _layer_norm_fwd(x, scale, bias, spec):
  plan, rows = spec.plan, spec.plan.rows
  stat = ((rows, 1), F32, "stat")
  kernel = functools.partial(layer_norm_fwd_kernel, plan=plan, epsilon=spec.epsilon,
                             has_scale=scale is not None, has_bias=bias is not None)
  y, shift, residual, var = call(
      kernel, plan, False,
      [(x, "rows"), (as_vector(scale), "vector"), (as_vector(bias), "vector")],
      [(x.shape, spec.out_dtype, "rows"), stat, stat, stat], "jaxnorm_layer_norm_fwd")
  return (y, shift, residual, var), (x, scale, bias, shift, residual, var)


def _layer_norm_bwd(spec, saved, cotangents):
  x, scale, bias, shift, residual, var = saved
  dy, _, d_residual, d_var = cotangents  # the shift is a constant (as the XLA path's)
  plan = spec.plan
  kernel = functools.partial(layer_norm_bwd_kernel, plan=plan, epsilon=spec.epsilon,
                             has_scale=scale is not None, has_bias=bias is not None)
  partial = ((1,), F32, "partial")
  outs = call(
      kernel, plan, True,
      [(x, "rows"), (as_vector(scale), "vector"), (dy, "rows"), (shift, "stat"),
       (residual, "stat"), (var, "stat"), (d_residual.astype(F32), "stat"),
       (d_var.astype(F32), "stat")],
      [(x.shape, x.dtype, "rows")] + [partial] * ((scale is not None) + (bias is not None)),
      "jaxnorm_layer_norm_bwd")
  dx, *partials = outs
  d_scale = d_bias = None
  if scale is not None:
    d_scale = jnp.sum(partials.pop(0), axis=(0, 1)).astype(scale.dtype)
  if bias is not None:
    d_bias = jnp.sum(partials.pop(0), axis=(0, 1)).astype(bias.dtype)
  return dx, d_scale, d_bias


layer_norm_rows.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ---- RMS norm --------------------------------------------------------------------------------

def rms_fwd_kernel(*refs, plan: Plan, epsilon: float, has_scale: bool, sum_dtype=None):
  """RMS norm of a block of rows; of ``x + residual`` with ``sum_dtype`` (as layer norm's)."""
  x_ref, *refs = refs
  add_ref = refs.pop(0) if sum_dtype is not None else None
  scale_ref = refs.pop(0) if has_scale else None
  y_ref, *h_refs = refs

  def body(block, carry):
    if sum_dtype is None:
      x = block.load(x_ref)
    else:
      x = residual_sum(block, x_ref, add_ref, h_refs[0], sum_dtype)
    y = x * lax.rsqrt(row_mean(x * x, plan.features) + epsilon)
    if has_scale:
      y = y * block.load(scale_ref, "vector")
    block.store(y_ref, y)
    return carry

  chunks(plan, False, body, 0)


def rms_bwd_kernel(*refs, plan: Plan, epsilon: float, has_scale: bool, has_dh: bool = False):
  """dx (plus ``dh`` where given) and the partial sums of d scale."""
  x_ref, *refs = refs
  scale_ref = refs.pop(0) if has_scale else None
  dy_ref, *refs = refs
  dh_ref = refs.pop(0) if has_dh else None
  dx_ref, *partial_refs = refs
  n = plan.features

  def body(block, sums):
    x, dy = block.load(x_ref), block.load(dy_ref)
    inverse_rms = lax.rsqrt(row_mean(x * x, n) + epsilon)
    xhat = x * inverse_rms
    g = dy * block.load(scale_ref, "vector") if has_scale else dy
    dx = inverse_rms * (g - xhat * row_mean(g * xhat, n))
    block.store(dx_ref, dx + block.load(dh_ref) if has_dh else dx)
    return tuple(s + block.column_sum(dy * xhat) for s in sums)

  sums = chunks(plan, True, body, tuple(jnp.zeros((1, plan.width), F32) for _ in partial_refs))
  for ref, total in zip(partial_refs, sums):
    Block(plan, 0, 0).store(ref, total, "partial")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm_rows(x: Array, scale: Array | None, spec: Spec) -> Array:
  """RMS norm of each row of a 2-D ``x``, ``x / sqrt(mean(x**2) + epsilon) * scale``.

  Args:
    x: ``(rows, features)``, any float dtype (the mean square in float32).
    scale: ``(features,)`` or ``None``.
    spec: epsilon, output dtype and plan (:func:`plan_for`).

  Returns:
    ``y`` in ``spec.out_dtype``.
  """
  return _rms_fwd(x, scale, spec)[0]


def _rms_fwd(x, scale, spec):
  kernel = functools.partial(rms_fwd_kernel, plan=spec.plan, epsilon=spec.epsilon,
                             has_scale=scale is not None)
  (y,) = call(kernel, spec.plan, False, [(x, "rows"), (as_vector(scale), "vector")],
               [(x.shape, spec.out_dtype, "rows")], "jaxnorm_rms_norm_fwd")
  return y, (x, scale)


def _rms_bwd(spec, saved, dy):
  x, scale = saved
  kernel = functools.partial(rms_bwd_kernel, plan=spec.plan, epsilon=spec.epsilon,
                             has_scale=scale is not None)
  outs = call(kernel, spec.plan, True,
               [(x, "rows"), (as_vector(scale), "vector"), (dy, "rows")],
               [(x.shape, x.dtype, "rows")] + [((1,), F32, "partial")] * (scale is not None),
               "jaxnorm_rms_norm_bwd")
  dx, *partials = outs
  d_scale = None if scale is None else jnp.sum(partials[0], axis=(0, 1)).astype(scale.dtype)
  return dx, d_scale


rms_norm_rows.defvjp(_rms_fwd, _rms_bwd)
