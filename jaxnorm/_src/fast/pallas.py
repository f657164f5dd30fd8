"""Pallas kernels behind the dispatch: ``normalize_rows`` and ``rms_rows`` under ``"pallas"``.

Registered under ``"pallas"`` (:mod:`jaxnorm._src.dispatch`): with ``JAXNORM_KERNELS=pallas``
or inside ``jaxnorm.kernels("pallas")``, layer and RMS norm over trailing axes on one device run
the kernels of :mod:`jaxnorm._src.fast.pallas_rows`, chosen per platform when the function is
lowered (:func:`jax.lax.platform_dependent`):

- ``cuda``: the Pallas-Triton kernel;
- ``tpu``: the Pallas-Mosaic kernel;
- ``cpu``: the Mosaic kernel in Pallas interpret mode (slow; it is there to test the kernels);
- elsewhere (ROCm, ...): the XLA path.

A call the kernels do not cover takes the XLA path (:mod:`jaxnorm._src.fast.xla`): a mask
(``where``), reduced axes that are not the trailing ones, a scale or bias that varies along the
kept axes, float64, an empty array, or rows wider than
:data:`~jaxnorm._src.fast.pallas_rows.MAX_FEATURES` (32768). The kernels stay opt-in until
``benchmarks/accelerator.py`` shows them paying on real hardware.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import Array, lax

from jaxnorm._src.fast import xla
from jaxnorm._src.moments import Moments

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


def kernel_shape(xf: Array, where: Array | None, axes: tuple[int, ...]) -> tuple[int, int] | None:
  """``(rows, features)`` where the kernels can take the call, else ``None``."""
  shape = xf.shape
  if (where is not None or not axes or not all(isinstance(n, int) for n in shape)
      or axes != tuple(range(len(shape) - len(axes), len(shape)))
      or not any(xf.dtype == d for d in KERNEL_DTYPES)):
    return None
  features = math.prod(shape[len(shape) - len(axes):])
  rows = math.prod(shape[:len(shape) - len(axes)])
  if rows == 0 or features == 0:
    return None
  return rows, features


def on_platforms(rows: int, features: int, dtype, kernel: Callable, fallback: Callable, *args):
  """``kernel(plan, *args)`` with each platform's plan, ``fallback(*args)`` where a platform
  has none."""
  pallas_rows = kernels_module()
  branches = {}
  for platform, layout in PLATFORM_LAYOUTS.items():
    plan = pallas_rows.plan_for(layout, rows, features, dtype, interpret=platform == "cpu")
    branches[platform] = (fallback if plan is None
                          else lambda *a, plan=plan: kernel(plan, *a))
  return lax.platform_dependent(*args, **branches, default=fallback)


def normalize_rows(xf: Array, where: Array | None, scale: Array | None, bias: Array | None,
                   axes: tuple[int, ...], epsilon: float) -> tuple[Array, Moments]:
  """:func:`normalize.normalize_rows` by the layer-norm kernels, else the XLA path.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("pallas"):  # on CPU: interpret mode
    ...   y = jaxnorm.layer_norm(jnp.array([[1e6 + 1.0, 1e6 - 1.0]]), epsilon=0.0)
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """
  rows_features = kernel_shape(xf, where, axes)
  scale_vector = row_param(scale, xf.shape, axes, xf.dtype)
  bias_vector = row_param(bias, xf.shape, axes, xf.dtype)
  if rows_features is None or scale_vector is False or bias_vector is False:
    return xla.normalize_rows(xf, where, scale, bias, axes, epsilon)
  rows, features = rows_features
  stat_shape = xf.shape[:len(xf.shape) - len(axes)] + (1,) * len(axes)

  def kernel(plan, x2, s, b):
    pallas_rows = kernels_module()
    y, shift, residual, var = pallas_rows.layer_norm_rows(
        x2, s, b, pallas_rows.Spec(epsilon, xf.dtype, plan))
    return y, shift, residual, var

  def fallback(x2, s, b):
    y, moments = xla.normalize_rows(x2, None, s, b, (1,), epsilon)
    return y, moments.shift, moments.residual, moments.var

  y, shift, residual, var = on_platforms(
      rows, features, xf.dtype, kernel, fallback, xf.reshape(rows, features), scale_vector,
      bias_vector)
  var = var.reshape(stat_shape)
  moments = Moments(jnp.full(stat_shape, features, var.dtype), shift.reshape(stat_shape),
                    residual.reshape(stat_shape), var)
  return y.reshape(xf.shape), moments


def rms_rows(xf: Array, where: Array | None, scale: Array | None, axes: tuple[int, ...],
             epsilon: float) -> Array:
  """:func:`normalize.rms_rows` by the RMS-norm kernels, else the XLA path.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("pallas"):
    ...   y = jaxnorm.rms_norm(jnp.array([[3.0, -3.0]]), epsilon=0.0)
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """
  rows_features = kernel_shape(xf, where, axes)
  scale_vector = row_param(scale, xf.shape, axes, xf.dtype)
  if rows_features is None or scale_vector is False:
    return xla.rms_rows(xf, where, scale, axes, epsilon)
  rows, features = rows_features

  def kernel(plan, x2, s):
    pallas_rows = kernels_module()
    return pallas_rows.rms_norm_rows(x2, s, pallas_rows.Spec(epsilon, xf.dtype, plan))

  def fallback(x2, s):
    return xla.rms_rows(x2, None, s, (1,), epsilon)

  y = on_platforms(rows, features, xf.dtype, kernel, fallback, xf.reshape(rows, features),
                   scale_vector)
  return y.reshape(xf.shape)
