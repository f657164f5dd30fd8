"""Pallas kernels behind the dispatch: ``normalize_rows``, ``rms_rows`` and the fused residual
add + norm, ``add_normalize_rows`` and ``add_rms_rows``, under ``"pallas"``.

Registered under ``"pallas"`` (:mod:`jaxnorm._src.dispatch`): with ``JAXNORM_KERNELS=pallas``
or inside ``jaxnorm.kernels("pallas")``, layer and RMS norm over trailing axes on one device run
the kernels of :mod:`jaxnorm._src.fast.pallas_rows` (``add_layer_norm`` and ``add_rms_norm``:
:mod:`jaxnorm._src.fast.pallas_add`), chosen per platform when the function is lowered
(:func:`jax.lax.platform_dependent`). The dispatch hands them ``x`` in its own dtype and the
output dtype: a kernel reads and writes the narrow arrays and widens in registers.

- ``cuda``: the Pallas-Triton kernel;
- ``tpu``: the Pallas-Mosaic kernel;
- ``cpu``: the Mosaic kernel in Pallas interpret mode (slow; it is there to test the kernels);
- elsewhere (ROCm, ...): the XLA path.

A call the kernels do not cover takes the XLA path (:mod:`jaxnorm._src.fast.xla`): a mask
(``where``), reduced axes that are not the trailing ones, a scale or bias that varies along the
kept axes, float64 (input, output or residual stream), an empty array, or rows wider than
:data:`~jaxnorm._src.fast.pallas_blocks.MAX_FEATURES` (32768). The kernels stay opt-in until
``benchmarks/accelerator.py`` shows them paying on real hardware.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import Array, lax

from jaxnorm._src import checks
from jaxnorm._src.fast import xla
from jaxnorm._src.moments import Moments

F32 = jnp.float32

def kernels_module():
  """:mod:`jaxnorm._src.fast.pallas_rows`, imported on first use (Pallas takes a while to
  import, and only the ``"pallas"`` mode needs it)."""
  from jaxnorm._src.fast import pallas_rows
  return pallas_rows


# The platforms with a kernel, and the layout each runs; every other platform takes XLA.
PLATFORM_LAYOUTS = {"cuda": "triton", "tpu": "mosaic", "cpu": "mosaic"}
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def row_param(param: Array | None, shape: tuple[int, ...], axes: tuple[int, ...],
              dtype) -> Array | None | bool:
  """``param`` (as :func:`checks.feature_param` returns it) as a ``(features,)`` vector over the
  flattened ``axes``, in ``dtype`` if it is not a float; ``None`` as ``None``; ``False`` where it
  varies along a kept axis (the kernels cannot take it)."""
  if param is None:
    return None
  if not jnp.issubdtype(param.dtype, jnp.inexact):
    param = param.astype(dtype)
  kept = len(shape) - len(axes)
  if param.ndim == 0:
    return jnp.broadcast_to(param, (math.prod(shape[kept:]),))
  if param.ndim != len(shape) or any(size != 1 for size in param.shape[:kept]):
    return False
  return jnp.broadcast_to(param.reshape(param.shape[kept:]), shape[kept:]).reshape(-1)


def kernel_shape(x: Array, where: Array | None, axes: tuple[int, ...],
                 *dtypes) -> tuple[int, int] | None:
  """``(rows, features)`` where the kernels can take the call, else ``None``: unmasked, over
  trailing axes, static non-empty shape, ``x`` and the other ``dtypes`` (output, residual) of
  :data:`KERNEL_DTYPES`."""
  shape = x.shape
  if (where is not None or not axes or not all(isinstance(n, int) for n in shape)
      or axes != tuple(range(len(shape) - len(axes), len(shape)))
      or not all(any(jnp.dtype(t) == d for d in KERNEL_DTYPES) for t in (x.dtype, *dtypes))):
    return None
  features = math.prod(shape[len(shape) - len(axes):])
  rows = math.prod(shape[:len(shape) - len(axes)])
  if rows == 0 or features == 0:
    return None
  return rows, features


def narrowest(*dtypes):
  """The dtype of fewest bytes (the Mosaic block's row count is a multiple of its tile)."""
  return min((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)


def on_platforms(rows: int, features: int, dtype, kernel: Callable, fallback: Callable, *args):
  """``kernel(plan, *args)`` with each platform's plan, ``fallback(*args)`` where a platform
  has none."""
  kernels_module()  # Pallas, imported on first use
  from jaxnorm._src.fast import pallas_blocks
  branches = {}
  for platform, layout in PLATFORM_LAYOUTS.items():
    plan = pallas_blocks.plan_for(layout, rows, features, dtype, interpret=platform == "cpu")
    branches[platform] = (fallback if plan is None
                          else lambda *a, plan=plan: kernel(plan, *a))
  return lax.platform_dependent(*args, **branches, default=fallback)


def output_dtype(x: Array, out_dtype) -> Any:
  """``out_dtype``, by default the reduction dtype of ``x`` (as the reference path)."""
  return jnp.dtype(out_dtype or checks.reduction_dtype(x.dtype))


def normalize_rows(x: Array, where: Array | None, scale: Array | None, bias: Array | None,
                   axes: tuple[int, ...], epsilon: float, *,
                   out_dtype: Any = None) -> tuple[Array, Moments]:
  """:func:`normalize.normalize_rows` by the layer-norm kernels, else the XLA path.

  The kernels read ``x`` in its own dtype and write ``out_dtype``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("pallas"):  # on CPU: interpret mode
    ...   y = jaxnorm.layer_norm(jnp.array([[1e6 + 1.0, 1e6 - 1.0]]), epsilon=0.0)
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """
  out_dtype = output_dtype(x, out_dtype)
  rows_features = kernel_shape(x, where, axes, out_dtype)
  scale_vector = row_param(scale, x.shape, axes, F32)
  bias_vector = row_param(bias, x.shape, axes, F32)
  if rows_features is None or scale_vector is False or bias_vector is False:
    return xla.normalize_rows(x, where, scale, bias, axes, epsilon, out_dtype=out_dtype)
  rows, features = rows_features
  stat_shape = x.shape[:len(x.shape) - len(axes)] + (1,) * len(axes)

  def kernel(plan, x2, s, b):
    pallas_rows = kernels_module()
    return pallas_rows.layer_norm_rows(x2, s, b, pallas_rows.Spec(epsilon, out_dtype, plan))

  def fallback(x2, s, b):
    y, moments = xla.normalize_rows(x2, None, s, b, (1,), epsilon, out_dtype=out_dtype)
    return y, moments.shift, moments.residual, moments.var

  y, shift, residual, var = on_platforms(
      rows, features, narrowest(x.dtype, out_dtype), kernel, fallback,
      x.reshape(rows, features), scale_vector, bias_vector)
  var = var.reshape(stat_shape)
  moments = Moments(jnp.full(stat_shape, features, var.dtype), shift.reshape(stat_shape),
                    residual.reshape(stat_shape), var)
  return y.reshape(x.shape), moments


def rms_rows(x: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
             epsilon: float, *, out_dtype: Any = None) -> Array:
  """:func:`normalize.rms_rows` by the RMS-norm kernels, else the XLA path.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("pallas"):
    ...   y = jaxnorm.rms_norm(jnp.array([[3.0, -3.0]], jnp.bfloat16), epsilon=0.0)
    >>> y
    Array([[1, -1]], dtype=bfloat16)
  """
  out_dtype = output_dtype(x, out_dtype)
  rows_features = kernel_shape(x, where, axes, out_dtype)
  scale_vector = row_param(scale, x.shape, axes, F32)
  if rows_features is None or scale_vector is False:
    return xla.rms_rows(x, where, scale, axes, epsilon, out_dtype=out_dtype)
  rows, features = rows_features

  def kernel(plan, x2, s):
    pallas_rows = kernels_module()
    return pallas_rows.rms_norm_rows(x2, s, pallas_rows.Spec(epsilon, out_dtype, plan))

  def fallback(x2, s):
    return xla.rms_rows(x2, None, s, (1,), epsilon, out_dtype=out_dtype)

  y = on_platforms(rows, features, narrowest(x.dtype, out_dtype), kernel, fallback,
                   x.reshape(rows, features), scale_vector)
  return y.reshape(x.shape)


def add_kernel_module():
  """:mod:`jaxnorm._src.fast.pallas_add`, imported on first use."""
  from jaxnorm._src.fast import pallas_add
  return pallas_add


def _fused(x: Array, residual: Array, where, axes, epsilon, params, residual_dtype, out_dtype,
           kernel, fallback):
  """The fused add + norm kernels on the ``(rows, features)`` view, ``fallback`` elsewhere."""
  rows_features = kernel_shape(x, where, axes, residual.dtype, residual_dtype, out_dtype)
  vectors = [row_param(p, x.shape, axes, F32) for p in params]
  if rows_features is None or any(v is False for v in vectors):
    return None
  rows, features = rows_features
  add_module = add_kernel_module()

  def on_kernel(plan, x2, r2, *vectors):
    spec = kernels_module().Spec(epsilon, out_dtype, plan)
    add = add_module.AddSpec(spec, jnp.dtype(residual_dtype), x.dtype, residual.dtype)
    return kernel(add, x2, r2, *vectors)

  y, h = on_platforms(rows, features,
                      narrowest(x.dtype, residual.dtype, residual_dtype, out_dtype),
                      on_kernel, fallback, x.reshape(rows, features),
                      residual.reshape(rows, features), *vectors)
  return y.reshape(x.shape), h.reshape(x.shape)


def add_normalize_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                       bias: Array | None, axes: tuple[int, ...], epsilon: float, *,
                       residual_dtype: Any, out_dtype: Any) -> tuple[Array, Array]:
  """:func:`normalize.add_normalize_rows` by the fused kernel (reads ``x`` and ``residual``
  once, writes ``h`` and ``y``), else the XLA path.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("pallas"):
    ...   y, h = jaxnorm.add_layer_norm(jnp.array([[1.0, -1.0]]), jnp.array([[1e6, 1e6]]),
    ...                                 epsilon=0.0)
    >>> y, h
    (Array([[ 1., -1.]], dtype=float32), Array([[1000001.,  999999.]], dtype=float32))
  """
  out_dtype = jnp.dtype(out_dtype)

  def kernel(add, x2, r2, s, b):
    return add_kernel_module().add_layer_norm_rows(x2, r2, s, b, add)

  def fallback(x2, r2, s, b):
    return xla.add_normalize_rows(x2, r2, None, s, b, (1,), epsilon,
                                  residual_dtype=residual_dtype, out_dtype=out_dtype)

  fused = _fused(x, residual, where, axes, epsilon, (scale, bias), residual_dtype, out_dtype, kernel,
                 fallback)
  if fused is None:
    return xla.add_normalize_rows(x, residual, where, scale, bias, axes, epsilon,
                                  residual_dtype=residual_dtype, out_dtype=out_dtype)
  return fused


def add_rms_rows(x: Array, residual: Array, where: Array | None, scale: Array | None,
                 axes: tuple[int, ...], epsilon: float, *, residual_dtype: Any,
                 out_dtype: Any) -> tuple[Array, Array]:
  """:func:`normalize.add_rms_rows` by the fused kernel, else the XLA path."""
  out_dtype = jnp.dtype(out_dtype)

  def kernel(add, x2, r2, s):
    return add_kernel_module().add_rms_norm_rows(x2, r2, s, add)

  def fallback(x2, r2, s):
    return xla.add_rms_rows(x2, r2, None, s, (1,), epsilon, residual_dtype=residual_dtype,
                            out_dtype=out_dtype)

  fused = _fused(x, residual, where, axes, epsilon, (scale,), residual_dtype, out_dtype,
                 kernel, fallback)
  if fused is None:
    return xla.add_rms_rows(x, residual, where, scale, axes, epsilon,
                            residual_dtype=residual_dtype, out_dtype=out_dtype)
  return fused
