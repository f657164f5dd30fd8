"""Flax Linen layers: drop-in for ``flax.linen``'s norms, thin over jaxnorm's pure functions.

Each layer declares its variables under Flax's names (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``) and calls one function: a model can swap
``flax.linen.BatchNorm`` for ``jaxnorm.linen.BatchNorm`` and keep its checkpoint.

``use_fast_variance`` and ``force_float32_reductions`` are accepted so that Flax code runs
unchanged; jaxnorm always reduces in at least float32 with its stable variance, which costs the
same as Flax's fast one.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import functional

Initializer = Any
Axes = Any


def scale_and_bias(module: nn.Module, feature_shape: tuple[int, ...], *, use_scale: bool,
                   use_bias: bool, scale_init: Initializer, bias_init: Initializer,
                   param_dtype: Any) -> tuple[jax.Array | None, jax.Array | None]:
  """Declares ``params/scale`` and ``params/bias`` of the feature shape, as Flax does."""
  scale = module.param("scale", scale_init, feature_shape, param_dtype) if use_scale else None
  bias = module.param("bias", bias_init, feature_shape, param_dtype) if use_bias else None
  return scale, bias


def feature_shape_of(x: jax.Array, axes: Axes, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The canonical feature axes of ``x`` and their shape."""
  feature_axes = checks.canonical_axes(axes, x.ndim, name=name, shape=x.shape)
  return feature_axes, tuple(x.shape[a] for a in feature_axes)


def running_stats(module: nn.Module, feature_shape: tuple[int, ...]):
  """Declares ``batch_stats/mean`` (zeros) and ``batch_stats/var`` (ones), in float32."""
  mean = module.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
  var = module.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
  return mean, var


def declare_batch_norm(module: nn.Module, x, layer: str):
  """x checked, its feature axes, and the variables of the batch norm family, in Flax's order.

  ``module`` has :class:`BatchNorm`'s attributes. Returns ``(x, feature_axes, mean, var,
  scale, bias)``: the ``batch_stats`` variables and the ``params`` (or None).
  """
  x = checks.float_input(x, layer, complex_ok=layer == "BatchNorm")
  feature_axes, feature_shape = feature_shape_of(x, module.axis, "axis")
  mean, var = running_stats(module, feature_shape)
  scale, bias = scale_and_bias(
      module, feature_shape, use_scale=module.use_scale, use_bias=module.use_bias,
      scale_init=module.scale_init, bias_init=module.bias_init, param_dtype=module.param_dtype)
  return x, feature_axes, mean, var, scale, bias


def batch_norm_training(module: nn.Module, x, feature_axes: tuple[int, ...],
                        use_running_average: bool, batch_fits: bool = True) -> bool:
  """Training mode, except while initializing with a batch the statistics cannot use.

  Flax models are often initialized with a batch of one: ``init`` then normalizes with the
  running statistics instead of raising. ``batch_fits`` adds a layer's own rule.
  """
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  too_small = bn.values_per_channel(x.shape, reduction_axes) < 2 or not batch_fits
  if module.is_initializing() and too_small:
    return False
  return not use_running_average


def store_running_stats(module: nn.Module, training: bool, variables, new_state) -> None:
  """Writes the next running state into its variables in training, never while initializing."""
  if training and not module.is_initializing():
    for variable, new_value in zip(variables, new_state, strict=True):
      variable.value = new_value


class BatchNorm(nn.Module):
  """Batch normalization (Ioffe and Szegedy 2015), drop-in for ``flax.linen.BatchNorm``.

  Differences from Flax, all fixes: a stable variance at any offset; masked statistics pooled
  by count across devices (a fully masked device contributes nothing); a batch with a
  non-finite statistic, or fewer than 2 valid values, leaves a channel's running statistics
  unchanged; the running variance averages the unbiased batch variance (as PyTorch), or with
  ``unbiased_running_var=False`` the biased one (Flax's rule, to keep a Flax model's statistics
  evolving as they did).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["mean"]
    Array([0.03, 0.04], dtype=float32)
  """
  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x, feature_axes, mean, var, scale, bias = declare_batch_norm(self, x, type(self).__name__)
    state = self._state_variables(mean, var)
    training = batch_norm_training(self, x, feature_axes, use_running_average,
                                   self._batch_fits(x, feature_axes))
    initializing = self.is_initializing()
    options = self._options()
    if not self.unbiased_running_var and "unbiased_running_var" not in options:
      raise ValueError(f"{type(self).__name__} keeps the unbiased running variance; "
                       f"unbiased_running_var=False (Flax's rule) is BatchNorm's option only")
    y, new_state = self.function(
        x, self._running(state), scale, bias, training=training, axis=feature_axes,
        momentum=self.momentum, epsilon=self.epsilon, where=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype, **options)
    store_running_stats(self, training, state, new_state)
    return y

  # What a variant changes: the pure function, its running state, its options and batch rule.
  function = staticmethod(bn.batch_norm)

  def _state_variables(self, mean, var) -> tuple[Any, ...]:
    return mean, var

  def _running(self, state) -> Any:
    return bn.BatchStats(*(variable.value for variable in state))

  def _options(self) -> dict[str, Any]:
    return {"unbiased_running_var": self.unbiased_running_var}

  def _batch_fits(self, x, feature_axes: tuple[int, ...]) -> bool:
    return True


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al. 2016), drop-in for ``flax.linen.LayerNorm``.

  ``scale_offset=1.0`` with ``scale_init=initializers.zeros`` stores the scale zero-centred and
  gives :math:`\\hat x (1 + \\gamma) + \\beta` (Gemma, Transformer Engine's
  ``zero_centered_gamma``): checkpoints stored that way load as they are.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x = jnp.array([[1e4 + 1.0, 1e4 - 1.0]])
    >>> jnn.LayerNorm(epsilon=0.0).init_with_output(jax.random.key(0), x)[0]
    Array([[ 1., -1.]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "LayerNorm", complex_ok=True)
    feature_axes, feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    scale, bias = scale_and_bias(
        self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    return functional.layer_norm(
        x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        scale_offset=self.scale_offset)


class RMSNorm(nn.Module):
  """Root mean square normalization (Zhang and Sennrich 2019), drop-in for ``flax.linen.RMSNorm``.

  ``scale_offset=1.0`` with ``scale_init=initializers.zeros`` gives Gemma's
  :math:`\\hat x (1 + \\gamma)`, reading its checkpoints as stored.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> jnn.RMSNorm(epsilon=0.0).init_with_output(jax.random.key(0), jnp.array([[3.0, -3.0]]))[0]
    Array([[ 1., -1.]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "RMSNorm", complex_ok=True)
    feature_axes, feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    scale, _ = scale_and_bias(
        self, feature_shape, use_scale=self.use_scale, use_bias=False,
        scale_init=self.scale_init, bias_init=None, param_dtype=self.param_dtype)
    return functional.rms_norm(
        x, scale, reduction_axes=self.reduction_axes, feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        scale_offset=self.scale_offset)


class GroupNorm(nn.Module):
  """Group normalization (Wu and He 2018), drop-in for ``flax.linen.GroupNorm`` (channels last).

  Unlike Flax's, it accepts a mask that broadcasts, such as ``(N, H, W, 1)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> jnn.GroupNorm(num_groups=2, epsilon=0.0).init_with_output(jax.random.key(0), x)[0]
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "GroupNorm", complex_ok=True)
    scale, bias = scale_and_bias(
        self, (x.shape[-1],), use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    return functional.group_norm(
        x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
        epsilon=self.epsilon, reduction_axes=self.reduction_axes, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class InstanceNorm(nn.Module):
  """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.linen.InstanceNorm``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])
    >>> jnn.InstanceNorm(epsilon=0.0).init_with_output(jax.random.key(0), x)[0][0]
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "InstanceNorm", complex_ok=True)
    feature_axes, feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    scale, bias = scale_and_bias(
        self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    return functional.instance_norm(
        x, scale, bias, feature_axes=feature_axes, epsilon=self.epsilon, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype)
