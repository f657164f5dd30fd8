"""Folding an evaluation-mode batch norm into the Dense or Conv layer next to it.

In evaluation a batch norm is a per-channel affine map, :math:`y = a\\,x + c` with
:math:`a = \\gamma / \\sqrt{\\hat\\sigma^2 + \\epsilon}` and :math:`c = \\beta - a\\,\\hat\\mu`.
After a linear layer it folds into that layer's kernel and bias (:func:`fold_batch_norm`);
before one, into the next layer's (:func:`fold_preceding_batch_norm`). Either way the folded
model skips a full pass over the activations, as PyTorch's ``fuse_conv_bn_eval`` does.

Kernels have their output features on the last axis and their input features on the one
before, as Flax's Dense ``(in, out)`` and Conv ``(*window, in, out)``. The arithmetic is done in
float64 (NumPy on the host for concrete arrays, or JAX with x64 enabled), else in float32, and
the result is cast to the kernel's dtype. :mod:`jaxnorm._src.folding_layers` applies the folds to
a Flax Linen variables tree and to NNX layers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike


# Paddings of a conv's input that commute with a per-channel affine map of that input: the
# padded values of the normalized input are the normalized padded values.
AFFINE_SAFE_PADDINGS = ("VALID", "CIRCULAR", "REFLECT", "EDGE")


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def _affine(mean, var, scale, bn_bias, epsilon: float, xp, wide):
  """The per-channel map of an evaluation-mode batch norm: ``(a, c)`` with ``y = a x + c``."""
  mean, var = xp.asarray(mean, wide), xp.asarray(var, wide)
  gain = 1.0 / xp.sqrt(var + epsilon)
  if scale is not None:
    gain = gain * xp.asarray(scale, wide)
  shift = -mean * gain
  if bn_bias is not None:
    shift = shift + xp.asarray(bn_bias, wide)
  return gain, shift


def _arithmetic(kernel, *others):
  """``(xp, wide dtype)``: float64 NumPy for host arrays, float64 JAX with x64, else float32."""
  if _is_concrete(kernel, *others):
    return np, np.float64
  if jax.config.jax_enable_x64:
    return jnp, jnp.float64
  return jnp, jnp.promote_types(jnp.asarray(kernel).dtype, jnp.float32)


def _check_statistics(kernel, bias, stats: Mapping[str, Any], features: int, axis_name: str,
                      where: str) -> None:
  for name, value in stats.items():
    if value is not None and tuple(np.shape(value)) != (features,):
      raise ValueError(
          f"{name}.shape={tuple(np.shape(value))} does not match the {features} {where} of "
          f"kernel.shape={tuple(np.shape(kernel))} (its {axis_name}); the kernel must have its "
          f"output features on the last axis and its input features on the one before, as "
          f"flax's Dense (in, out) and Conv (*window, in, out) (transpose a PyTorch weight "
          f"(out, in, *window) with np.moveaxis(w, (0, 1), (-1, -2))), and the statistics "
          f"must be those of the norm next to that axis")
  out = np.shape(kernel)[-1]
  if bias is not None and tuple(np.shape(bias)) != (out,):
    raise ValueError(f"bias.shape={tuple(np.shape(bias))} does not match the {out} output "
                     f"features of kernel.shape={tuple(np.shape(kernel))}; pass the layer's "
                     f"own bias, or None if it has none")


def _check_kernel(kernel) -> None:
  if np.ndim(kernel) < 2:
    raise ValueError(f"kernel.shape={tuple(np.shape(kernel))} has fewer than 2 axes; pass a "
                     f"Dense kernel (in, out) or a Conv kernel (*window, in, out)")


def _check_axis(axis: int, kernel, what: str) -> None:
  ndim = np.ndim(kernel)
  if axis not in (-1, ndim - 1):
    raise ValueError(
        f"the norm's axis={axis} is not the channel axis of the {what} (the last, -1, or "
        f"{ndim - 1} for an output of the kernel's rank {ndim}); folding is only exact for a "
        f"norm over the channels the kernel maps, so fold only norms with axis=-1 (channels "
        f"last, as flax's Dense and Conv give)")


def fold_batch_norm(kernel: ArrayLike, bias: ArrayLike | None, mean: ArrayLike, var: ArrayLike,
                    *, scale: ArrayLike | None = None, bn_bias: ArrayLike | None = None,
                    epsilon: float = 1e-5, axis: int = -1) -> tuple[Array, Array]:
  """Folds a batch norm in evaluation mode into the Dense or Conv layer *before* it.

  .. math::

     W' = W\\,a, \\qquad b' = (b - \\hat\\mu)\\,a + \\beta, \\qquad
     a = \\frac{\\gamma}{\\sqrt{\\hat\\sigma^2 + \\epsilon}}

  so that ``layer'(x) == norm(layer(x))`` with the running statistics, for any padding,
  strides, dilation or feature groups of a Conv (the map acts on its output channels).

  Args:
    kernel: the layer's kernel, output features on the last axis (Dense ``(in, out)``, Conv
      ``(*window, in, out)``).
    bias: the layer's bias ``(out,)``, or None for a layer without one.
    mean, var: the norm's running statistics ``(out,)``.
    scale, bn_bias: the norm's :math:`\\gamma` and :math:`\\beta` (None: 1 and 0).
    epsilon: the norm's epsilon (flax's default 1e-5).
    axis: the norm's feature axis in the layer's output (counted in an output of the kernel's
      rank, which a Conv's has): only the last axis folds.

  Returns:
    ``(kernel, bias)`` of the folded layer, both in the kernel's dtype.

  Raises:
    ValueError: statistics that do not match the kernel's output features, or a norm over
      another axis.

  Example:
    >>> import numpy as np, jaxnorm
    >>> kernel, bias = jaxnorm.fold_batch_norm(np.ones((2, 1), np.float32), None,
    ...                                        mean=np.array([1.0]), var=np.array([4.0]),
    ...                                        epsilon=0.0)
    >>> kernel.ravel(), bias
    (Array([0.5, 0.5], dtype=float32), Array([-0.5], dtype=float32))
  """
  _check_kernel(kernel)
  _check_axis(axis, kernel, "layer's output")
  out = np.shape(kernel)[-1]
  _check_statistics(kernel, bias, {"mean": mean, "var": var, "scale": scale, "bn_bias": bn_bias},
                    out, "the last axis", "output features")
  dtype = jnp.asarray(kernel).dtype
  xp, wide = _arithmetic(kernel, bias, mean, var, scale, bn_bias)
  gain, shift = _affine(mean, var, scale, bn_bias, epsilon, xp, wide)
  new_kernel = xp.asarray(kernel, wide) * gain
  new_bias = shift if bias is None else xp.asarray(bias, wide) * gain + shift
  return jnp.asarray(new_kernel, dtype), jnp.asarray(new_bias, dtype)


def _check_padding(padding, kernel) -> None:
  if np.ndim(kernel) == 2 or padding is None:
    return
  if isinstance(padding, str):
    if padding.upper() in AFFINE_SAFE_PADDINGS:
      return
  elif isinstance(padding, int) and padding == 0:
    return
  elif not isinstance(padding, str) and np.all(np.asarray(padding) == 0):
    return
  raise ValueError(
      f"a batch norm before a Conv with padding={padding!r} cannot fold exactly: the conv pads "
      f"the normalized input with zeros, which are not the normalized zeros of the raw input, "
      f"so the border outputs would change. Fold only convs with padding 'VALID' (or "
      f"'CIRCULAR', or explicit zeros), or pad the raw input yourself with the per-channel "
      f"value mean - bn_bias * sqrt(var + epsilon) / scale and use a 'VALID' conv")


def fold_preceding_batch_norm(kernel: ArrayLike, bias: ArrayLike | None, mean: ArrayLike,
                              var: ArrayLike, *, scale: ArrayLike | None = None,
                              bn_bias: ArrayLike | None = None, epsilon: float = 1e-5,
                              padding: Any = "VALID", axis: int = -1) -> tuple[Array, Array]:
  """Folds a batch norm in evaluation mode into the Dense or Conv layer *after* it.

  For pre-activation blocks whose norm feeds a linear layer directly (a norm on the input, or
  before a classifier head): with :math:`a, c` the norm's map (:math:`a` as in
  :func:`fold_batch_norm`, :math:`c = \\beta - a\\hat\\mu`),

  .. math::

     W'_{\\dots,i,o} = W_{\\dots,i,o}\\,a_i, \\qquad
     b'_o = b_o + \\sum_{\\dots,i} W_{\\dots,i,o}\\,c_i

  so that ``layer'(x) == layer(norm(x))``. For a Conv this holds only where padding leaves the
  input's values alone ('VALID', explicit zeros) or repeats them ('CIRCULAR'): zero padding of
  the normalized input ('SAME', 'CAUSAL', non-zero explicit padding) raises.

  Args:
    kernel: the layer's kernel, input features on axis -2 (Dense ``(in, out)``, Conv
      ``(*window, in, out)``); a grouped conv (fewer inputs than channels) does not fold.
    bias: the layer's bias ``(out,)``, or None.
    mean, var, scale, bn_bias, epsilon: the norm's, over the ``in`` channels.
    padding: the Conv's padding (ignored for a Dense kernel).
    axis: the norm's feature axis in the layer's input: only the last (channels) folds.

  Returns:
    ``(kernel, bias)`` of the folded layer, in the kernel's dtype.

  Raises:
    ValueError: mismatched shapes, a norm over another axis, or a padding that breaks it.

  Example:
    >>> import numpy as np, jaxnorm
    >>> kernel, bias = jaxnorm.fold_preceding_batch_norm(
    ...     np.ones((2, 1), np.float32), None, mean=np.array([1.0, 3.0]),
    ...     var=np.array([4.0, 4.0]), epsilon=0.0)
    >>> kernel.ravel(), bias
    (Array([0.5, 0.5], dtype=float32), Array([-2.], dtype=float32))
  """
  _check_kernel(kernel)
  _check_axis(axis, kernel, "layer's input")
  _check_padding(padding, kernel)
  features = np.shape(kernel)[-2]
  _check_statistics(kernel, bias, {"mean": mean, "var": var, "scale": scale, "bn_bias": bn_bias},
                    features, "axis -2", "input features (a grouped conv does not fold)")
  dtype = jnp.asarray(kernel).dtype
  xp, wide = _arithmetic(kernel, bias, mean, var, scale, bn_bias)
  gain, shift = _affine(mean, var, scale, bn_bias, epsilon, xp, wide)
  wide_kernel = xp.asarray(kernel, wide)
  new_kernel = wide_kernel * gain[:, None]
  new_bias = xp.tensordot(shift, xp.moveaxis(wide_kernel, -2, 0), axes=(0, 0))
  new_bias = new_bias.reshape(-1, np.shape(kernel)[-1]).sum(axis=0)
  if bias is not None:
    new_bias = new_bias + xp.asarray(bias, wide)
  return jnp.asarray(new_kernel, dtype), jnp.asarray(new_bias, dtype)
