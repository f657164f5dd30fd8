"""Flax NNX layers over :mod:`jaxnorm._src.weight_norms`.

``WeightNorm`` and ``SpectralNorm`` wrap a layer as ``flax.nnx``'s do, with their arguments
and state (``scales[path]``; ``batch_stats[path + ("u",)]`` and ``[path + ("sigma",)]``), so
a model swaps them and keeps its checkpoint. One fix: ``flax.nnx`` writes the normalized
kernel into the wrapped layer on every call (the optimizer then updates the normalized kernel,
and spectral norm divides it again at the next call); jaxnorm calls a copy of the layer that
holds the normalized kernel and leaves the layer's own parameters as they are. The weight
norm ``scales`` are ``nnx.Param`` (trained by ``nnx.Optimizer(..., wrt=nnx.Param)``), where
``flax.nnx`` keeps plain arrays that no optimizer updates.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src import response_norms as rn
from jaxnorm._src import weight_norms as wn
from jaxnorm._src.nnx_common import (NO_METADATA, Initializer, check_features,
                                     draws_random_values, param, scale_and_bias, store, value)


def call_with(layer: nnx.Module, replaced: Mapping[tuple, jax.Array], method: Callable,
              *args, **kwargs):
  """``method(copy, *args, **kwargs)`` where ``copy`` is ``layer`` with the variables at the
  paths of ``replaced`` holding those values; every other variable is ``layer``'s own."""
  graphdef, state = nnx.split(layer)
  flat = [(path, variable.replace(replaced[path]) if path in replaced else variable)
          for path, variable in nnx.to_flat_state(state)]
  return method(nnx.merge(graphdef, nnx.from_flat_state(flat)), *args, **kwargs)


def call(module, *args, **kwargs):
  return module(*args, **kwargs)


class WeightNorm(nnx.Module):
  """Weight normalization (Salimans and Kingma 2016), drop-in for ``flax.nnx.WeightNorm``.

  Each variable of ``layer_instance`` that ``variable_filter`` selects is divided by its L2
  norm over every axis but ``feature_axes`` and multiplied by its ``scales[path]``
  (:func:`jaxnorm.weight_norm`) for the call; the layer's own variables are left unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> layer = jnnx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> layer(jnp.ones((1, 2))).shape, layer.scales[("kernel",)][...].shape
    ((1, 3), (3,))
  """

  def __init__(self, layer_instance: nnx.Module, *, feature_axes: Any = -1,
               use_scale: bool = True, scale_init: Initializer = initializers.ones,
               epsilon: float = 1e-12, dtype: Any = None, param_dtype: Any = jnp.float32,
               variable_filter: Any = nnx.PathContains("kernel"), promote_dtype: Any = None,
               rngs: nnx.Rngs | None = None):
    self.layer_instance = layer_instance
    self.feature_axes = () if feature_axes is None else feature_axes
    self.use_scale = use_scale
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    self.promote_dtype = promote_dtype
    scales = {}
    if use_scale:
      for path, variable in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
        if self.variable_filter(path, variable):
          features, _ = wn.split_axes(variable[...], self.feature_axes)
          shape = tuple(variable.shape[a] for a in features)
          # flax.nnx draws no key for a constant initializer: neither does jaxnorm.
          draws = rngs is not None and draws_random_values(scale_init, shape, param_dtype)
          scales[path] = param(scale_init, shape, param_dtype, rngs if draws else None,
                               NO_METADATA)
    self.scales = nnx.data(scales)

  def __call__(self, x, *args, **kwargs):
    replaced = {}
    for path, variable in nnx.to_flat_state(nnx.state(self.layer_instance)):
      if not self.variable_filter(path, variable):
        continue
      if self.use_scale and path not in self.scales:
        raise RuntimeError(f"WeightNorm has no scale for {path}: the variables of "
                           f"layer_instance changed after WeightNorm was built; build it anew")
      scale = value(self.scales[path]) if self.use_scale else None
      replaced[path] = wn.weight_norm(variable[...], scale, feature_axes=self.feature_axes,
                                      epsilon=self.epsilon, dtype=self.dtype)
    return call_with(self.layer_instance, replaced, call, x, *args, **kwargs)


class SpectralNorm(nnx.Module):
  """Spectral normalization (Miyato et al. 2018), drop-in for ``flax.nnx.SpectralNorm``.

  Each parameter of ``layer_instance`` with 2 or more axes is divided by its largest singular
  value (:func:`jaxnorm.spectral_norm`, power iteration in float32 or wider) for the call;
  ``update_stats`` (default: ``not use_running_average``, set by ``model.train()`` and
  ``model.eval()``) stores the new ``u`` and ``sigma``.

  ``operator_norm=True`` (not in Flax) divides the kernel by the operator norm of the layer's
  map from its input, with ``u`` of shape ``(1, *input_shape)``: for a convolution, the norm
  of the convolution itself. ``input_shape`` is one input's shape without the batch axis; the
  layer must be affine with one kernel (``Conv``, ``ConvTranspose``, ``Linear``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> rngs = nnx.Rngs(0)
    >>> layer = jnnx.SpectralNorm(nnx.Conv(2, 3, (3, 3), rngs=rngs), operator_norm=True,
    ...                           input_shape=(8, 8, 2), rngs=rngs)
    >>> layer(jnp.ones((1, 8, 8, 2))).shape, layer.batch_stats[("kernel", "u")][...].shape
    ((1, 8, 8, 3), (1, 8, 8, 2))
  """

  def __init__(self, layer_instance: nnx.Module, *, n_steps: int = 1, epsilon: float = 1e-12,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               error_on_non_matrix: bool = False, update_stats: bool = True,
               operator_norm: bool = False, input_shape: tuple[int, ...] | None = None,
               rngs: nnx.Rngs):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    self.use_running_average = not update_stats
    self.operator_norm = operator_norm
    if operator_norm and input_shape is None:
      raise ValueError("SpectralNorm(operator_norm=True) needs input_shape, the shape of one "
                       "input without the batch axis, e.g. input_shape=(32, 32, 3)")
    kernels = [(path, variable) for path, variable in
               nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)) if variable.ndim > 1]
    if operator_norm and len(kernels) != 1:
      raise ValueError(
          f"SpectralNorm(operator_norm=True) wraps one affine layer with one kernel, but the "
          f"layer has {len(kernels)} parameters of 2 or more axes ({[p for p, _ in kernels]}); "
          f"wrap each convolution in its own SpectralNorm")
    stats = {}
    for path, variable in kernels if n_steps >= 1 else ():
      if variable.ndim > 2 and error_on_non_matrix:
        raise ValueError(f"parameter {path} is {variable.ndim}-d but error_on_non_matrix=True; "
                         f"set it to False to normalize it reshaped to (-1, {variable.shape[-1]})")
      state = wn.init_spectral_state(rngs.params(), variable.shape, dtype=param_dtype,
                                     input_shape=input_shape if operator_norm else None,
                                     stddev=0.01)  # as flax.nnx draws it
      stats[path + ("u",)] = nnx.BatchStat(state.u)
      stats[path + ("sigma",)] = nnx.BatchStat(state.sigma)
    self.batch_stats = nnx.data(stats)

  def __call__(self, x, update_stats: bool | None = None, **kwargs):
    if update_stats is None:
      update_stats = not self.use_running_average
    replaced = {}
    for path, variable in nnx.to_flat_state(nnx.state(self.layer_instance, nnx.Param)):
      if variable.ndim <= 1 or self.n_steps < 1:
        continue
      if path + ("u",) not in self.batch_stats:
        raise RuntimeError(f"SpectralNorm has no u for {path}: the parameters of "
                           f"layer_instance changed after SpectralNorm was built; build it anew")
      u, sigma = self.batch_stats[path + ("u",)], self.batch_stats[path + ("sigma",)]
      kernel = variable[...]
      y, new = wn.spectral_norm(
          kernel, wn.SpectralState(u[...], sigma[...]), n_steps=self.n_steps,
          epsilon=self.epsilon, operator=self._operator(path) if self.operator_norm else None,
          dtype=self.dtype or jnp.result_type(kernel.dtype, self.param_dtype))
      if update_stats:
        store(u, new.u, "SpectralNorm")
        store(sigma, new.sigma, "SpectralNorm")
      replaced[path] = y
    return call_with(self.layer_instance, replaced, call, x, **kwargs)

  def _operator(self, path: tuple) -> wn.Operator:
    """The linear part of the wrapped layer's map from its input, as a function of the kernel."""
    def operator(kernel, u):
      def apply(inputs):
        return call_with(self.layer_instance, {path: kernel}, call, inputs)
      return apply(u) - apply(jnp.zeros_like(u))
    return operator

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``: True stops the updates."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class StdConv(nnx.Conv):
  """``flax.nnx.Conv`` with weight standardization (Qiao et al. 2019), as BiT's convolutions.

  ``nnx.Conv``'s arguments plus ``epsilon``; the stored ``kernel`` is standardized over every
  axis but the last for each call (:func:`jaxnorm.weight_standardize`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> conv = jnnx.StdConv(2, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 5, 5, 2))).shape
    (1, 5, 5, 4)
  """

  def __init__(self, *args, epsilon: float = 1e-5, **kwargs):
    super().__init__(*args, **kwargs)
    self.epsilon = epsilon

  def __call__(self, inputs, *args, **kwargs):
    standardized = {("kernel",): self.standardize(self.kernel[...])}
    return call_with(self, standardized, nnx.Conv.__call__, inputs, *args, **kwargs)

  def standardize(self, kernel):
    return wn.weight_standardize(kernel, epsilon=self.epsilon)


class ScaledStdConv(StdConv):
  """``flax.nnx.Conv`` with NF-Nets' scaled weight standardization (Brock et al. 2021).

  :func:`jaxnorm.scaled_weight_standardize` with a learned ``gain`` per output feature
  (``gain_init``, ones) and the constant ``gamma``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> conv = jnnx.ScaledStdConv(2, 4, (3, 3), gamma=1.7139, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 5, 5, 2))).shape, conv.gain[...].shape
    ((1, 5, 5, 4), (4,))
  """

  def __init__(self, *args, gamma: float = 1.0, epsilon: float = 1e-4,
               gain_init: Initializer = initializers.ones_init(), **kwargs):
    super().__init__(*args, epsilon=epsilon, **kwargs)
    self.gamma = gamma
    self.gain = param(gain_init, (self.out_features,), self.param_dtype, kwargs.get("rngs"),
                      NO_METADATA, "gain")

  def standardize(self, kernel):
    return wn.scaled_weight_standardize(kernel, self.gain[...], gamma=self.gamma,
                                        epsilon=self.epsilon, dtype=kernel.dtype)


class FilterResponseNorm(nnx.Module):
  """Filter response normalization with TLU (Singh and Krishnan 2020), channels last.

  Holds ``scale``, ``bias`` and (``use_tlu``) ``tau``, each of shape ``(num_features,)``;
  :func:`jaxnorm.filter_response_norm` then :func:`jaxnorm.tlu`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.FilterResponseNorm(3)(jnp.ones((1, 4, 4, 3))).shape
    (1, 4, 4, 3)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               use_tlu: bool = True, bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               tau_init: Initializer = initializers.zeros_init(), reduction_axes: Any = None,
               rngs: nnx.Rngs | None = None):
    self.scale, self.bias = scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs, scale_metadata=NO_METADATA,
        bias_metadata=NO_METADATA)
    self.tau = (param(tau_init, (num_features,), param_dtype, rngs, NO_METADATA, "tau")
                if use_tlu else nnx.data(None))
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.reduction_axes = reduction_axes

  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "FilterResponseNorm")
    check_features(x, -1, (self.num_features,), layer="FilterResponseNorm", name=None)
    y = rn.filter_response_norm(x, value(self.scale), value(self.bias), epsilon=self.epsilon,
                                axes=self.reduction_axes, where=mask, dtype=self.dtype)
    return y if self.tau is None else rn.tlu(y, value(self.tau).astype(y.dtype))


class TLU(nnx.Module):
  """Thresholded linear unit ``max(x, tau)`` with a learned ``tau`` per channel.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.TLU(2)(jnp.array([[-1.0, 2.0]]))
    Array([[0., 2.]], dtype=float32)
  """

  def __init__(self, num_features: int, *, param_dtype: Any = jnp.float32,
               tau_init: Initializer = initializers.zeros_init(), rngs: nnx.Rngs | None = None):
    self.tau = param(tau_init, (num_features,), param_dtype, rngs, NO_METADATA, "tau")

  def __call__(self, x):
    return rn.tlu(x, self.tau[...])


class EvoNormS0(nnx.Module):
  """EvoNorm-S0 (Liu et al. 2020), batch-independent, as timm's ``EvoNorm2dS0``.

  Holds ``scale``, ``bias`` and ``v`` of shape ``(num_features,)``; :func:`jaxnorm.evonorm_s0`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.EvoNormS0(4, num_groups=2)(jnp.ones((1, 3, 3, 4))).shape
    (1, 3, 3, 4)
  """

  def __init__(self, num_features: int, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-5, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               v_init: Initializer = initializers.ones_init(), rngs: nnx.Rngs | None = None):
    self.num_groups = functional.num_groups_for(
        num_features, None if group_size else num_groups, group_size,
        f"num_features={num_features}")
    self.scale, self.bias = scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs, scale_metadata=NO_METADATA,
        bias_metadata=NO_METADATA)
    self.v = param(v_init, (num_features,), param_dtype, rngs, NO_METADATA, "v")
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "EvoNormS0")
    check_features(x, -1, (self.num_features,), layer="EvoNormS0", name=None)
    return rn.evonorm_s0(x, value(self.scale), value(self.bias), self.v[...],
                         num_groups=self.num_groups, epsilon=self.epsilon, where=mask,
                         dtype=self.dtype)


class EvoNormB0(nnx.Module):
  """EvoNorm-B0 (Liu et al. 2020), as timm's ``EvoNorm2dB0``, with a running variance.

  Holds ``scale``, ``bias``, ``v`` and the ``nnx.BatchStat`` ``var`` (float32), which moves in
  training as batch norm's (:func:`jaxnorm.evonorm_b0`). ``use_running_average`` as in
  ``BatchNorm``: set by ``model.train()`` / ``model.eval()``, overridden by the call.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.EvoNormB0(2)
    >>> y = layer(jnp.arange(16.0).reshape(2, 2, 2, 2))
    >>> layer.var[...]
    Array([3.3000002, 3.3000002], dtype=float32)
  """

  def __init__(self, num_features: int, *, use_running_average: bool | None = False,
               momentum: float = 0.9, epsilon: float = 1e-3, dtype: Any = None,
               param_dtype: Any = jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               v_init: Initializer = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, rngs: nnx.Rngs | None = None):
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.scale, self.bias = scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs, scale_metadata=NO_METADATA,
        bias_metadata=NO_METADATA)
    self.v = param(v_init, (num_features,), param_dtype, rngs, NO_METADATA, "v")
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError("EvoNormB0 needs use_running_average: pass it to the constructor, to "
                       "the call, or set it with model.train() / model.eval()")
    x = checks.float_input(x, "EvoNormB0")
    check_features(x, -1, (self.num_features,), layer="EvoNormB0", name=None)
    training = not use_running_average
    y, new_var = rn.evonorm_b0(
        x, self.var[...], value(self.scale), value(self.bias), self.v[...], training=training,
        momentum=self.momentum, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)
    if training:
      store(self.var, new_var, "EvoNormB0")
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
