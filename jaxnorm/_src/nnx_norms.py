"""Flax NNX layer, RMS, group and instance norms: drop-in for ``flax.nnx``'s."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src.nnx_common import (NO_METADATA, Axes, Features, Initializer, check_features,
                                     feature_shape_of, scale_and_bias, value)


class LayerNorm(nnx.Module):
  """Layer normalization (Ba, Kiros and Hinton 2016), drop-in for ``flax.nnx.LayerNorm``.

  .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot \\gamma
     + \\beta

  with the statistics of each example over ``reduction_axes`` (:func:`jaxnorm.layer_norm`).
  Arguments as ``flax.nnx.LayerNorm``; ``num_features`` may be a tuple when ``feature_axes``
  names several axes. ``scale_offset=1.0`` with ``scale_init=zeros_init()`` stores the scale
  zero-centred, :math:`\\hat x (1 + \\gamma) + \\beta` (Gemma, Transformer Engine's
  ``zero_centered_gamma``).

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.LayerNorm(2, epsilon=0.0)(jnp.array([[1e4 + 1.0, 1e4 - 1.0]]))
    Array([[ 1., -1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      scale_offset: float = 0.0,
  ):
    self.scale, self.bias = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.scale_offset = scale_offset

  def __call__(self, x, *, mask=None):
    """Normalizes each example of ``x``; ``mask`` selects the elements that enter the stats."""
    x = checks.float_input(x, "LayerNorm", complex_ok=True)
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="LayerNorm", name="feature_axes")
    return functional.layer_norm(
        x, value(self.scale), value(self.bias), reduction_axes=self.reduction_axes,
        feature_axes=feature_axes, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        scale_offset=self.scale_offset)


class RMSNorm(nnx.Module):
  """Root mean square normalization (Zhang and Sennrich 2019), drop-in for ``flax.nnx.RMSNorm``.

  .. math:: y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}} \\cdot \\gamma

  over ``reduction_axes`` (:func:`jaxnorm.rms_norm`). Arguments as ``flax.nnx.RMSNorm``;
  ``scale_offset=1.0`` with ``scale_init=zeros_init()`` gives Gemma's :math:`\\hat x (1 + \\gamma)`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.RMSNorm(2, epsilon=0.0)(jnp.array([[3.0, -3.0]]))
    Array([[ 1., -1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      scale_offset: float = 0.0,
  ):
    self.scale, _ = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=False,
        scale_init=scale_init, bias_init=None, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=NO_METADATA)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.scale_offset = scale_offset

  def __call__(self, x, mask=None):
    """Normalizes each example of ``x``; ``mask`` selects the elements that enter the stats."""
    x = checks.float_input(x, "RMSNorm", complex_ok=True)
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="RMSNorm", name="feature_axes")
    return functional.rms_norm(
        x, value(self.scale), reduction_axes=self.reduction_axes, feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        scale_offset=self.scale_offset)


class GroupNorm(nnx.Module):
  """Group normalization (Wu and He 2018), drop-in for ``flax.nnx.GroupNorm`` (channels last).

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)}
     + \\epsilon}} \\cdot \\gamma_c + \\beta_c

  over each group of ``num_features / num_groups`` consecutive channels
  (:func:`jaxnorm.group_norm`). Unlike Flax's, it accepts a mask that broadcasts, such as
  ``(N, H, W, 1)``. Give exactly one of ``num_groups`` and ``group_size``; both are then set.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.GroupNorm(4, num_groups=2, epsilon=0.0)(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes | None = None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.num_groups = functional.num_groups_for(num_features, num_groups, group_size,
                                                f"num_features={num_features}")
    self.group_size = num_features // self.num_groups
    self.scale, self.bias = scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    """Normalizes each example of ``x`` per group of channels (the last axis)."""
    x = checks.float_input(x, "GroupNorm", complex_ok=True)
    check_features(x, -1, (self.num_features,), layer="GroupNorm", name=None)
    return functional.group_norm(
        x, value(self.scale), value(self.bias), num_groups=self.num_groups,
        epsilon=self.epsilon, reduction_axes=self.reduction_axes, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class InstanceNorm(nnx.Module):
  """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.nnx.InstanceNorm``.

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,c}}{\\sqrt{\\sigma^2_{n,c}
     + \\epsilon}} \\cdot \\gamma_c + \\beta_c

  with the statistics of each example and channel over the remaining axes
  (:func:`jaxnorm.instance_norm`). Arguments as ``flax.nnx.InstanceNorm``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.InstanceNorm(2, epsilon=0.0)(jnp.array([[[1.0, 10.0], [3.0, 30.0]]]))[0]
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.scale, self.bias = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    """Normalizes each example and channel of ``x`` over its other axes."""
    x = checks.float_input(x, "InstanceNorm", complex_ok=True)
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="InstanceNorm", name="feature_axes")
    return functional.instance_norm(
        x, value(self.scale), value(self.bias), feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)
