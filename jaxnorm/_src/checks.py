"""Argument checks shared by every normalization: each error says how to fix the call."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

Axes = int | Sequence[int]


def canonical_axes(axes: Axes, ndim: int, *, name: str = "axes", shape=None) -> tuple[int, ...]:
  """Returns ``axes`` as sorted non-negative ints (None: every axis), or raises naming the fix."""
  if axes is None:
    return tuple(range(ndim))
  if isinstance(axes, (int, np.integer)):
    axes_tuple = (axes,)
  else:
    try:
      axes_tuple = tuple(axes)
    except TypeError:
      raise TypeError(f"{name}={axes!r} must be an int or a sequence of ints, "
                      f"e.g. {name}=-1 or {name}=(1, 2)") from None
  shape_text = f"x.shape={tuple(shape)}" if shape is not None else f"x.ndim={ndim}"
  result = []
  for axis in axes_tuple:
    if not isinstance(axis, (int, np.integer)):
      raise TypeError(f"{name}={axes!r} must be ints; got {axis!r}")
    if not -ndim <= axis < ndim:
      raise ValueError(
          f"{name}={axes!r}: axis {axis} is out of range for {shape_text}; "
          f"use axes in [{-ndim}, {ndim - 1}]")
    result.append(int(axis) % ndim)
  if len(set(result)) != len(result):
    raise ValueError(f"{name}={axes!r} names an axis twice for {shape_text}; list each axis once")
  return tuple(sorted(result))


def float_input(x: ArrayLike, layer: str, *, complex_ok: bool = False) -> Array:
  """Returns ``x`` as an array, raising a TypeError for input that is not floating point.

  With ``complex_ok``, complex input is accepted too (the norms whose statistics have a complex
  meaning: mean :math:`E[x]`, variance :math:`E|x - E[x]|^2`, as Flax's).
  """
  x = jnp.asarray(x)
  if complex_ok and jnp.issubdtype(x.dtype, jnp.complexfloating):
    return x
  if not jnp.issubdtype(x.dtype, jnp.floating):
    kinds = " (or complex)" if complex_ok else ""
    raise TypeError(
        f"{layer} expects floating-point input{kinds}, got dtype {x.dtype}; cast it first, "
        f"e.g. x.astype(jnp.float32), or x.astype(jnp.float32) / 255 for uint8 images")
  return x


def reduction_dtype(dtype: Any) -> Any:
  """The dtype statistics are reduced in: at least float32 (complex64 for complex input);
  float64 and complex128 stay as they are."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> Any:
  """The real dtype of the same precision: float32 for complex64, ``dtype`` for real ones."""
  return jnp.finfo(dtype).dtype


def abs_square(a: Array) -> Array:
  """:math:`|a|^2`, real: ``a * a`` for real ``a``, ``re² + im²`` for complex."""
  if jnp.iscomplexobj(a):
    return a.real * a.real + a.imag * a.imag
  return a * a


def broadcast_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> Array | None:
  """Checks that a mask broadcasts to ``shape`` (without changing it) and returns it as bool."""
  if where is None:
    return None
  where = jnp.asarray(where)
  try:
    full = np.broadcast_shapes(where.shape, shape)
  except ValueError:
    full = None
  if full != tuple(shape):
    raise ValueError(
        f"mask of shape {where.shape} does not broadcast to x.shape={tuple(shape)}; give a mask "
        f"with x's shape, or with size 1 on the axes where it does not vary, e.g. "
        f"{tuple(shape[:-1]) + (1,)}")
  # Leading size-1 axes broadcast the same and give every mask the rank of x.
  return where.reshape((1,) * (len(shape) - where.ndim) + where.shape).astype(bool)


def feature_param(param: ArrayLike | None, shape: tuple[int, ...], feature_axes: tuple[int, ...],
                  name: str) -> Array | None:
  """Returns scale or bias shaped to broadcast against x.

  ``param`` has the shape of x's feature axes (as Flax stores it), or x's number of axes with
  the feature sizes on the feature axes and size 1 on the others (or size 1 everywhere), or is
  a scalar. A 1-D param of another axis' size is refused: it would broadcast along that axis.
  """
  if param is None:
    return None
  param = jnp.asarray(param)
  feature_shape = tuple(shape[a] for a in feature_axes)
  if param.shape == feature_shape:
    return param.reshape([shape[a] if a in feature_axes else 1 for a in range(len(shape))])
  if param.ndim == 0:
    return param
  if param.ndim == len(shape) and all(
      size == 1 or (a in feature_axes and size == shape[a]) for a, size in enumerate(param.shape)):
    return param
  broadcast_shape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
  raise ValueError(
      f"{name} of shape {param.shape} does not fit x.shape={tuple(shape)} with feature axes "
      f"{feature_axes}; give it the feature shape {feature_shape} (or {broadcast_shape})")


def running_stats_shape(running: Any, feature_shape: tuple[int, ...], name: str) -> None:
  """Checks that running statistics have exactly the feature shape, naming how to make them."""
  init = "init_renorm_stats" if hasattr(running, "step") else "init_batch_stats"
  for field in ("mean", "var"):
    found = jnp.shape(getattr(running, field))
    if found != tuple(feature_shape):
      raise ValueError(
          f"{name}: running.{field} of shape {found} does not match the feature shape "
          f"{tuple(feature_shape)} of x; use jaxnorm.{init}({_shape_text(feature_shape)}) "
          f"to start")


def _shape_text(feature_shape: tuple[int, ...]) -> str:
  """``4`` for one feature axis, ``(4, 5)`` for several: as init_batch_stats takes it."""
  return str(feature_shape[0]) if len(feature_shape) == 1 else str(tuple(feature_shape))
