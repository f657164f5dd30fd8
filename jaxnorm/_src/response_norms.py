"""Batch-independent activation norms: filter response norm with TLU, and EvoNorm.

Filter response normalization (Singh and Krishnan 2020) divides each example and channel by its
root mean square over space, with no centring; TLU is its learned threshold. EvoNorm-S0 and B0
(Liu et al. 2020), as timm ships them, gate by a sigmoid and divide by a group standard
deviation (S0) or by the larger of the batch and instance standard deviations (B0). Moments come
from :mod:`jaxnorm._src.moments` (at least float32, stable far from zero).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src import moments as moments_lib
from jaxnorm._src.normalize import output_dtype

Axes = int | Sequence[int] | None


def spatial_axes(x: Array, name: str) -> tuple[int, ...]:
  """Every axis but the first (batch) and the last (channels), or an error naming the fix."""
  if x.ndim < 3:
    raise ValueError(
        f"{name} normalizes over spatial axes, but x.shape={x.shape} has none; give x as "
        f"(batch, *spatial, channels), e.g. (N, H, W, C) or (N, L, C)")
  return tuple(range(1, x.ndim - 1))


def per_channel(x: Array, **params: ArrayLike | None) -> list[Array | None]:
  """Per-channel parameters (of shape ``(C,)``, or broadcasting) shaped against ``x``."""
  return [checks.feature_param(p, x.shape, (x.ndim - 1,), name) for name, p in params.items()]


def affine(y: Array, scale: Array | None, bias: Array | None) -> Array:
  """``y * scale + bias``, each optional."""
  y = y if scale is None else y * scale
  return y if bias is None else y + bias


def filter_response_norm(x: ArrayLike, scale: ArrayLike | None = None,
                         bias: ArrayLike | None = None, *, epsilon: float = 1e-6,
                         axes: Axes = None, where: ArrayLike | None = None,
                         dtype: Any = None) -> Array:
  """Filter response normalization: divide by the root mean square over the spatial axes.

  .. math:: \\nu^2_{n,c} = \\frac{1}{|S|}\\sum_{s \\in S} x_{n,s,c}^2, \\qquad
     y = \\gamma_c \\frac{x}{\\sqrt{\\nu^2_{n,c} + \\epsilon}} + \\beta_c

  per example and channel, with no centring (Singh and Krishnan 2020, "Filter Response
  Normalization Layer"); follow it with :func:`tlu`. Channels last.

  Args:
    x, scale, bias: input ``(batch, *spatial, channels)``; optional :math:`\\gamma, \\beta`.
    epsilon, axes: what the mean square adds; its axes (default: all but first and last).
    where, dtype: optional mask broadcastable to ``x``; the output dtype.

  Returns:
    The normalized input.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.filter_response_norm(jnp.array([[[3.0], [-5.0]]]) * 1e3, epsilon=0.0)[..., 0]
    Array([[ 0.7276069, -1.2126781]], dtype=float32)
  """
  x = checks.float_input(x, "filter_response_norm")
  axes = spatial_axes(x, "filter_response_norm") if axes is None else checks.canonical_axes(
      axes, x.ndim, shape=x.shape)
  scale, bias = per_channel(x, scale=scale, bias=bias)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  mean_square = moments_lib.mean_square(xf, axes, checks.broadcast_mask(where, x.shape))
  y = affine(xf * lax.rsqrt(mean_square + epsilon), scale, bias)
  return y.astype(output_dtype(x, scale, bias, dtype=dtype))


def tlu(x: ArrayLike, tau: ArrayLike) -> Array:
  """Thresholded linear unit: ``max(x, tau)`` with a learned per-channel ``tau``.

  .. math:: z = \\max(y, \\tau_c)

  (Singh and Krishnan 2020); with :math:`\\tau = 0`, ReLU.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.tlu(jnp.array([[-1.0, 2.0]]), jnp.array([0.0, 3.0]))
    Array([[0., 3.]], dtype=float32)
  """
  x = checks.float_input(x, "tlu")
  (tau,) = per_channel(x, tau=tau)
  return jnp.maximum(x, tau).astype(output_dtype(x, tau))


def evonorm_s0(x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None,
               v: ArrayLike | None = None, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-5,
               where: ArrayLike | None = None, dtype: Any = None) -> Array:
  """EvoNorm-S0: a sigmoid-gated input over its group standard deviation, batch-independent.

  .. math:: y = \\frac{x\\, \\mathrm{sigmoid}(v_c x)}{\\sqrt{\\sigma^2_{n,g(c)} + \\epsilon}}
     \\gamma_c + \\beta_c

  with :math:`\\sigma^2_{n,g}` the variance of example ``n`` over its spatial axes and the
  channels of group ``g`` (Liu et al. 2020, "Evolving Normalization-Activation Layers"; as
  timm's ``EvoNorm2dS0``). Channels last; ``group_size``, when given, sets the groups.

  Args:
    x, scale, bias, v: input ``(batch, *spatial, channels)``; optional per-channel
      :math:`\\gamma, \\beta, v` (``v`` None: 1).
    num_groups, group_size, epsilon: the channel groups (one of them); what the variance adds.
    where, dtype: optional mask broadcastable to ``x`` (for the statistics); output dtype.

  Returns:
    The normalized, activated input.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[[0.0, 2.0], [0.0, -2.0]]])
    >>> jaxnorm.evonorm_s0(x, num_groups=1, epsilon=0.0)
    Array([[[ 0.        ,  1.245635  ],
            [ 0.        , -0.16857839]]], dtype=float32)
  """
  x = checks.float_input(x, "evonorm_s0")
  axes = spatial_axes(x, "evonorm_s0") + (x.ndim - 1,)
  channels = x.shape[-1]
  groups = functional.num_groups_for(channels, None if group_size else num_groups, group_size,
                                     f"x.shape={x.shape}")
  scale, bias, v = per_channel(x, scale=scale, bias=bias, v=v)
  moments = moments_lib.group_moments(x, axes, channels // groups,
                                      checks.broadcast_mask(where, x.shape), None)
  xf = x.astype(moments.var.dtype)
  gate = jax.nn.sigmoid(xf if v is None else xf * v)
  y = affine(xf * gate * lax.rsqrt(moments.var + epsilon), scale, bias)
  return y.astype(output_dtype(x, scale, bias, v, dtype=dtype))


def evonorm_b0(x: ArrayLike, running_var: ArrayLike | None, scale: ArrayLike | None = None,
               bias: ArrayLike | None = None, v: ArrayLike | None = None, *, training: bool,
               momentum: float = 0.9, epsilon: float = 1e-3, where: ArrayLike | None = None,
               axis_name: Any = None, axis_index_groups: Any = None,
               dtype: Any = None) -> tuple[Array, Array | None]:
  """EvoNorm-B0: the input over the larger of its batch and its instance spread.

  .. math:: y = \\frac{x}{\\max\\big(\\sqrt{\\sigma^2_{B,c} + \\epsilon},\\;
     v_c x + \\sqrt{\\sigma^2_{n,c} + \\epsilon}\\big)} \\gamma_c + \\beta_c

  with :math:`\\sigma^2_{B,c}` the batch variance (pooled by count over ``axis_name``) in
  training, the running variance in evaluation, :math:`\\sigma^2_{n,c}` the variance of example
  ``n`` over its spatial axes (Liu et al. 2020; timm's ``EvoNorm2dB0``). The running variance
  moves as batch norm's (:func:`jaxnorm.update_batch_stats`); there is no running mean.

  Args:
    x, running_var: input ``(batch, *spatial, channels)``; the running variance ``(C,)``
      (``jnp.ones(C)`` to start; None in training: batch statistics only).
    scale, bias, v: optional per-channel :math:`\\gamma, \\beta, v` (``v`` None: 1).
    training, momentum: batch (True) or running variance; the weight of the old running
      variance (0.9: timm's 0.1 in PyTorch's convention).
    epsilon, where, dtype: what both variances add; optional mask; output dtype.
    axis_name, axis_index_groups: pool the batch variance over these devices.

  Returns:
    ``(y, next_running_var)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[[1.0], [3.0]], [[-1.0], [-3.0]]])
    >>> y, var = jaxnorm.evonorm_b0(x, jnp.ones(1), training=True, epsilon=0.0)
    >>> y[..., 0], var
    (Array([[ 0.4472136,  0.75     ],
           [-0.4472136, -1.3416407]], dtype=float32), Array([1.5666666], dtype=float32))
  """
  x = checks.float_input(x, "evonorm_b0")
  spatial, features = spatial_axes(x, "evonorm_b0"), (x.ndim - 1,)
  where = checks.broadcast_mask(where, x.shape)
  if running_var is not None and jnp.shape(running_var) != (x.shape[-1],):
    raise ValueError(
        f"evonorm_b0: running_var of shape {jnp.shape(running_var)} does not fit the "
        f"{x.shape[-1]} channels of x.shape={x.shape}; start with jnp.ones({x.shape[-1]})")
  scale, bias, v = per_channel(x, scale=scale, bias=bias, v=v)
  next_var = running_var
  if training:
    batch = moments_lib.pooled_moments(x, bn.batch_axes(x, features, axis_name), where,
                                       axis_name, axis_index_groups)
    var = batch.var
    if running_var is not None:
      running = jnp.asarray(running_var)
      next_var = bn.update_batch_stats(bn.BatchStats(jnp.zeros_like(running), running),
                                       bn.feature_shaped(batch, features), momentum).var
  elif running_var is None:
    raise ValueError("evonorm_b0 with training=False needs running_var, the running variance "
                     "of shape (C,) (jnp.ones(C) before any training)")
  else:
    var = checks.feature_param(running_var, x.shape, features, "running_var")
  instance = moments_lib.pooled_moments(x, spatial, where, None)
  xf = x.astype(instance.var.dtype)
  right = (xf if v is None else xf * v) + jnp.sqrt(instance.var + epsilon)
  y = xf / jnp.maximum(jnp.sqrt(var.astype(xf.dtype) + epsilon), right)
  return affine(y, scale, bias).astype(output_dtype(x, scale, bias, v, dtype=dtype)), next_var
