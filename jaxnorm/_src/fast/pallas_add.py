"""Pallas kernels for the fused residual add + norm of a ``(rows, features)`` array.

``h = x + residual; y = norm(h)`` (layer or RMS norm over the last axis) in one kernel each
way, on the blocks of :mod:`jaxnorm._src.fast.pallas_rows` (the same :class:`~.Plan`, the same
kernel bodies with the sum switched on):

- forward: reads ``x`` and ``residual`` once, writes ``h`` (in the residual stream's dtype)
  and ``y``; ``y`` is the norm of ``h`` as rounded, as on the reference path;
- backward: reads ``h``, ``dy`` and ``dh`` once and writes the cotangent of the sum,
  :math:`dh + \\partial y / \\partial h^\\top dy`, which ``x`` and ``residual`` share (both
  enter ``h`` with weight 1); d scale and d bias as per-program partial sums.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxnorm._src.fast import pallas_rows
from jaxnorm._src.fast.pallas_blocks import F32, call
from jaxnorm._src.fast.pallas_rows import Spec, as_vector


class AddSpec(NamedTuple):
  """The static part of a fused call: the norm's :class:`~.Spec`, the dtype of ``h``, and the
  dtypes of ``x`` and ``residual`` (their cotangents come back in them)."""
  spec: Spec
  sum_dtype: Any
  x_dtype: Any
  residual_dtype: Any


def _sum_cotangent(add: AddSpec, d_sum: Array) -> tuple[Array, Array]:
  return d_sum.astype(add.x_dtype), d_sum.astype(add.residual_dtype)


def _partial_sums(partials: list[Array], *params: Array | None) -> list[Array | None]:
  """The gradients of the parameters given, from one partial row per program each."""
  return [None if p is None else jnp.sum(partials.pop(0), axis=(0, 1)).astype(p.dtype)
          for p in params]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def add_layer_norm_rows(x: Array, residual: Array, scale: Array | None, bias: Array | None,
                        add: AddSpec) -> tuple[Array, Array]:
  """``(layer_norm(h), h)`` with ``h = x + residual``, by the kernels of ``add.spec.plan``.

  Args:
    x, residual: ``(rows, features)``, float32, bfloat16 or float16.
    scale, bias: ``(features,)`` or ``None``.
    add: the norm's spec, the dtype of ``h`` and the dtypes of the inputs.

  Returns:
    ``y`` in ``add.spec.out_dtype`` and ``h`` in ``add.sum_dtype``.
  """
  return _add_layer_norm_fwd(x, residual, scale, bias, add)[0]


def _add_layer_norm_fwd(x, residual, scale, bias, add):
  spec = add.spec
  plan = spec.plan
  stat = ((plan.rows, 1), F32, "stat")
  kernel = functools.partial(pallas_rows.layer_norm_fwd_kernel, plan=plan,
                             epsilon=spec.epsilon, has_scale=scale is not None,
                             has_bias=bias is not None, sum_dtype=add.sum_dtype)
  y, h, shift, mean_residual, var = call(
      kernel, plan, False,
      [(x, "rows"), (residual, "rows"), (as_vector(scale), "vector"),
       (as_vector(bias), "vector")],
      [(x.shape, spec.out_dtype, "rows"), (x.shape, add.sum_dtype, "rows"), stat, stat, stat],
      "jaxnorm_add_layer_norm_fwd")
  return (y, h), (h, scale, bias, shift, mean_residual, var)


def _add_layer_norm_bwd(add, saved, cotangents):
  h, scale, bias, shift, mean_residual, var = saved
  dy, dh = cotangents
  plan = add.spec.plan
  kernel = functools.partial(pallas_rows.layer_norm_bwd_kernel, plan=plan,
                             epsilon=add.spec.epsilon, has_scale=scale is not None,
                             has_bias=bias is not None, has_dh=True)
  no_statistics = jnp.zeros_like(shift)  # y alone leaves the statistics: no cotangents
  d_sum, *partials = call(
      kernel, plan, True,
      [(h, "rows"), (as_vector(scale), "vector"), (dy, "rows"), (shift, "stat"),
       (mean_residual, "stat"), (var, "stat"), (no_statistics, "stat"),
       (no_statistics, "stat"), (dh, "rows")],
      [(h.shape, h.dtype, "rows")]
      + [((1,), F32, "partial")] * ((scale is not None) + (bias is not None)),
      "jaxnorm_add_layer_norm_bwd")
  return (*_sum_cotangent(add, d_sum), *_partial_sums(partials, scale, bias))


add_layer_norm_rows.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def add_rms_norm_rows(x: Array, residual: Array, scale: Array | None,
                      add: AddSpec) -> tuple[Array, Array]:
  """``(rms_norm(h), h)`` with ``h = x + residual``, as :func:`add_layer_norm_rows`."""
  return _add_rms_fwd(x, residual, scale, add)[0]


def _add_rms_fwd(x, residual, scale, add):
  spec = add.spec
  kernel = functools.partial(pallas_rows.rms_fwd_kernel, plan=spec.plan, epsilon=spec.epsilon,
                             has_scale=scale is not None, sum_dtype=add.sum_dtype)
  y, h = call(kernel, spec.plan, False,
              [(x, "rows"), (residual, "rows"), (as_vector(scale), "vector")],
              [(x.shape, spec.out_dtype, "rows"), (x.shape, add.sum_dtype, "rows")],
              "jaxnorm_add_rms_norm_fwd")
  return (y, h), (h, scale)


def _add_rms_bwd(add, saved, cotangents):
  h, scale = saved
  dy, dh = cotangents
  kernel = functools.partial(pallas_rows.rms_bwd_kernel, plan=add.spec.plan,
                             epsilon=add.spec.epsilon, has_scale=scale is not None, has_dh=True)
  d_sum, *partials = call(
      kernel, add.spec.plan, True,
      [(h, "rows"), (as_vector(scale), "vector"), (dy, "rows"), (dh, "rows")],
      [(h.shape, h.dtype, "rows")] + [((1,), F32, "partial")] * (scale is not None),
      "jaxnorm_add_rms_norm_bwd")
  return (*_sum_cotangent(add, d_sum), *_partial_sums(partials, scale))


add_rms_norm_rows.defvjp(_add_rms_fwd, _add_rms_bwd)
