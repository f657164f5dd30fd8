"""Layer, RMS, group and instance normalization, and normalization with given statistics.

Pure functions: each checks its arguments once, takes the moments of the valid elements over
its axes (:mod:`jaxnorm._src.moments`) and normalizes with them
(:mod:`jaxnorm._src.normalize`), in at least float32, returning ``dtype`` (by default the result
type of ``x``, ``scale`` and ``bias``, as in Flax).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import dispatch
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import normalize as normalize_lib
from jaxnorm._src import collectives
from jaxnorm._src.moments import AxisName, Axes, Moments

Groups = Sequence[Sequence[int]] | None


def takes_rows(x: Array, axes: tuple[int, ...], feature_axes: tuple[int, ...] | None,
               axis_name: AxisName | None) -> bool:
  """Whether a norm of ``x`` over ``axes`` is one dispatched row operation: on one device (no
  ``axis_name``, no Explicit sharding of the reduced axes) and, for parameters along
  ``feature_axes`` (``None`` for RMS norm, whose scale never folds), parameters that vary along
  a reduced axis (else :func:`normalize_over` folds them into the moments per channel)."""
  if axis_name is not None or collectives.explicit_shards(x, axes) is not None:
    return False
  return feature_axes is None or not all(x.shape[a] == 1 or a not in axes
                                         for a in feature_axes)


def normalize_over(x: Array, axes: tuple[int, ...], scale: ArrayLike | None,
                   bias: ArrayLike | None, *, feature_axes: tuple[int, ...], epsilon: float,
                   where: Array | None, axis_name: AxisName | None, axis_index_groups: Groups,
                   dtype: Any, group_size: int | None = None) -> tuple[Array, Moments]:
  """Normalizes ``x`` with the moments of its valid elements over ``axes``, then scales it.

  Arguments checked (canonical axes, a mask of x's rank). Returns the output and the moments.
  Where the parameters vary only along axes the moments keep (batch, group, instance norm), or
  the statistics are pooled over devices, the moments come first and
  :func:`normalize.normalize_with` folds the parameters into them. Where they vary along the
  reduced axes on one device (layer norm), statistics and output are one dispatched operation,
  ``"normalize_rows"``, handed ``x`` in its own dtype and the output dtype (each path widens
  ``x`` itself, so that a kernel reads and writes the narrow arrays).
  """
  if group_size is not None or not takes_rows(x, axes, feature_axes, axis_name):
    if group_size is None:
      moments = moments_lib.pooled_moments(x, axes, where, axis_name, axis_index_groups)
    else:
      moments = moments_lib.group_moments(x, axes, group_size, where, axis_name,
                                          axis_index_groups)
    y = normalize_lib.normalize_with(x, moments, scale, bias, feature_axes=feature_axes,
                                     epsilon=epsilon, dtype=dtype)
    return y, moments
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
  out_dtype = normalize_lib.output_dtype(x, scale, bias, dtype=dtype)
  rows = dispatch.path("normalize_rows", normalize_lib.normalize_rows)
  return rows(x, where, scale, bias, axes, epsilon, out_dtype=out_dtype)


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
  x = checks.float_input(x, "normalize", complex_ok=True)
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  given = normalize_lib.given_moments(mean, var, x, feature_axes)
  return normalize_lib.normalize_with(x, given, scale, bias, feature_axes=feature_axes,
                                      epsilon=epsilon, dtype=dtype)


def offset_scale(x: Array, scale: ArrayLike | None, bias: ArrayLike | None, scale_offset: float,
                 dtype: Any, name: str) -> tuple[Array | None, Any]:
  """A zero-centred scale made whole, ``scale + scale_offset`` in float32 or wider, and the
  output dtype the stored scale gives (``dtype``, else the result type of x, scale and bias).

  With ``scale_offset=0`` both come back as given.
  """
  if not scale_offset:
    return scale, dtype
  if scale is None:
    raise ValueError(
        f"{name}: scale_offset={scale_offset} is added to a scale, but scale is None; pass the "
        f"stored zero-centred scale (zeros for the identity), or scale_offset=0.0")
  scale = jnp.asarray(scale)
  dtype = normalize_lib.output_dtype(x, scale, None if bias is None else jnp.asarray(bias),
                                     dtype=dtype)
  return scale.astype(checks.reduction_dtype(scale.dtype)) + scale_offset, dtype


def layer_norm(x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None, *,
               reduction_axes: Axes = -1, feature_axes: Axes = -1, epsilon: float = 1e-6,
               where: ArrayLike | None = None, axis_name: AxisName | None = None,
               axis_index_groups: Groups = None, dtype: Any = None,
               scale_offset: float = 0.0) -> Array:
  """Layer normalization (Ba, Kiros and Hinton 2016): statistics over each example's features.

  .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot
     (\\gamma + o) + \\beta

  with mean and variance over ``reduction_axes`` (and over devices with ``axis_name``), the valid
  elements only when ``where`` is given. ``scale_offset`` :math:`o` reads a zero-centred scale:
  ``scale_offset=1.0`` with a scale initialized to zeros gives :math:`\\hat x (1 + \\gamma)`, the
  convention of Gemma, Transformer Engine's ``zero_centered_gamma``, tokamax and praxis (the
  sum is taken in float32 or wider, so a bfloat16 scale near 0 keeps its precision).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.layer_norm(jnp.array([[1e4 + 1.0, 1e4 - 1.0]]), epsilon=0.0)
    Array([[ 1., -1.]], dtype=float32)
    >>> jaxnorm.layer_norm(jnp.array([[3.0, 1.0]]), jnp.array([0.5, 0.0]), epsilon=0.0,
    ...                    scale_offset=1.0)
    Array([[ 1.5, -1. ]], dtype=float32)
  """
  x = checks.float_input(x, "layer_norm", complex_ok=True)
  scale, dtype = offset_scale(x, scale, bias, scale_offset, dtype, "layer_norm")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  reduction_axes = checks.canonical_axes(reduction_axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  return normalize_over(x, reduction_axes, scale, bias, feature_axes=feature_axes,
                        epsilon=epsilon, where=where, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, dtype=dtype)[0]


def rms_norm(x: ArrayLike, scale: ArrayLike | None = None, *, reduction_axes: Axes = -1,
             feature_axes: Axes = -1, epsilon: float = 1e-6, where: ArrayLike | None = None,
             axis_name: AxisName | None = None, axis_index_groups: Groups = None,
             dtype: Any = None, scale_offset: float = 0.0) -> Array:
  """Root mean square normalization (Zhang and Sennrich 2019).

  .. math:: y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}} \\cdot (\\gamma + o)

  ``scale_offset`` :math:`o` reads a zero-centred scale, as in :func:`layer_norm`: Gemma's
  :math:`\\hat x (1 + \\gamma)` is ``scale_offset=1.0`` with the scale stored (and initialized)
  near 0.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.rms_norm(jnp.array([[3.0, -3.0]]), epsilon=0.0)
    Array([[ 1., -1.]], dtype=float32)
    >>> jaxnorm.rms_norm(jnp.array([[3.0, -3.0]]), jnp.zeros(2), epsilon=0.0, scale_offset=1.0)
    Array([[ 1., -1.]], dtype=float32)
  """
  x = checks.float_input(x, "rms_norm", complex_ok=True)
  scale, dtype = offset_scale(x, scale, None, scale_offset, dtype, "rms_norm")
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  axes = checks.canonical_axes(reduction_axes, x.ndim, shape=x.shape)
  where = checks.broadcast_mask(where, x.shape)
  scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
  out_dtype = normalize_lib.output_dtype(x, scale, dtype=dtype)
  if not takes_rows(x, axes, None, axis_name):
    return normalize_lib.rms_rows(x, where, scale, axes, epsilon, axis_name, axis_index_groups,
                                  out_dtype=out_dtype)
  rows = dispatch.path("rms_rows", normalize_lib.rms_rows)
  return rows(x, where, scale, axes, epsilon, out_dtype=out_dtype)


def num_groups_for(channels: int, num_groups: int | None, group_size: int | None,
                   source: str) -> int:
  """The number of groups from exactly one of ``num_groups`` and ``group_size``.

  ``source`` names where the channels come from in errors (``"x.shape=(...)"``, or
  ``"num_features=C"`` when a layer is built).
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"give exactly one of num_groups={num_groups} and group_size={group_size}; to set "
        f"group_size, pass num_groups=None")
  if group_size is not None:
    if group_size <= 0 or channels % group_size:
      raise ValueError(
          f"group_size={group_size} must divide the {channels} channels of {source}; "
          f"pick a divisor of {channels}")
    return channels // group_size
  if num_groups <= 0 or channels % num_groups:
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    raise ValueError(
        f"num_groups={num_groups} must divide the {channels} channels of {source}; "
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
  x = checks.float_input(x, "group_norm", complex_ok=True)
  if reduction_axes is None:
    reduction_axes = tuple(range(1, x.ndim - 1)) + (x.ndim - 1,)
  reduction_axes = checks.canonical_axes(reduction_axes, x.ndim, name="reduction_axes",
                                         shape=x.shape)
  if reduction_axes[-1] != x.ndim - 1:
    raise ValueError(
        f"reduction_axes={reduction_axes} must include the last axis, the channels of "
        f"x.shape={x.shape}; group_norm is channels-last")
  channels = x.shape[-1]
  groups = num_groups_for(channels, num_groups, group_size, f"x.shape={x.shape}")
  where = checks.broadcast_mask(where, x.shape)
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
  x = checks.float_input(x, "instance_norm", complex_ok=True)
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
  where = checks.broadcast_mask(where, x.shape)
  return normalize_over(x, reduction_axes, scale, bias, feature_axes=feature_axes,
                        epsilon=epsilon, where=where, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, dtype=dtype)[0]
