"""Flax Linen layers over :mod:`jaxnorm._src.weight_norms`.

``WeightNorm`` and ``SpectralNorm`` wrap a layer as ``flax.linen``'s do, with their arguments,
call signatures and variable names (``params/{layer}/kernel/scale``,
``batch_stats/{layer}/kernel/u`` and ``.../sigma``): a model swaps them and keeps its
checkpoint. ``StdConv`` and ``ScaledStdConv`` are ``flax.linen.Conv`` with a standardized
kernel (the same ``params/kernel`` and ``params/bias``; ``params/gain`` for the scaled one).
``FilterResponseNorm``, ``TLU``, ``EvoNormS0`` and ``EvoNormB0`` are channels-last norms.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import initializers

from jaxnorm._src import checks
from jaxnorm._src import response_norms as rn
from jaxnorm._src import weight_norms as wn
from jaxnorm._src.linen_norms import batch_norm_training, scale_and_bias, store_running_stats

Initializer = Any
Axes = Any


class WeightNorm(nn.Module):
  """Weight normalization (Salimans and Kingma 2016), drop-in for ``flax.linen.WeightNorm``.

  Each variable of ``layer_instance`` whose path contains a name in ``variable_filter`` is
  divided by its L2 norm over every axis but ``feature_axes`` and multiplied by a learned
  ``scale`` (:func:`jaxnorm.weight_norm`), reduced in float32 for low-precision kernels.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
    >>> layer = jnn.WeightNorm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'layer_instance': {'bias': (3,), 'kernel': (2, 3)}, 'layer_instance/kernel/scale': (3,)}
  """
  layer_instance: nn.Module
  epsilon: float = 1e-12
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  feature_axes: Axes | None = -1
  variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

  @nn.compact
  def __call__(self, *args, **kwargs):
    return nn.map_variables(
        lambda layer: layer(*args, **kwargs),
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(self._normalize, vs),
        init=self.is_initializing())(self.layer_instance)

  def _normalize(self, path, value):
    value = jnp.asarray(value)
    name = (self.layer_instance.name + "/"
            + jax.tree_util.keystr(path[1:], simple=True, separator="/"))
    if self.variable_filter and not any(key in name for key in self.variable_filter):
      return value
    features, _ = wn.split_axes(value, self.feature_axes)
    scale = None
    if self.use_scale:
      scale = self.param(name + "/scale", self.scale_init,
                         tuple(value.shape[a] for a in features), self.param_dtype)
    return wn.weight_norm(value, scale, feature_axes=self.feature_axes, epsilon=self.epsilon,
                          dtype=self.dtype)


class SpectralNorm(nn.Module):
  """Spectral normalization (Miyato et al. 2018), drop-in for ``flax.linen.SpectralNorm``.

  Every parameter of ``layer_instance`` with 2 or more axes is divided by its largest
  singular value, estimated by ``n_steps`` of power iteration per call from the stored ``u``
  (:func:`jaxnorm.spectral_norm`); ``update_stats=True`` (training, with
  ``mutable=["batch_stats"]``) stores the new ``u`` and ``sigma``. 1-d parameters are left as
  they are, as in Flax. The power iteration and its state run in float32 or wider, whatever
  ``param_dtype``.

  ``operator_norm=True`` (not in Flax) divides the kernel by the operator norm of the wrapped
  layer's map from its input instead, with ``u`` of the shape of one input
  (``(1, *x.shape[1:])``): for a convolution, the norm of the convolution, not of its
  reshaped kernel. The layer must be affine with one kernel (``Conv``, ``ConvTranspose``,
  ``Dense``) and take ``x`` first, with a batch axis.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
    >>> layer = jnn.SpectralNorm(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 2)), update_stats=False)
    >>> jax.tree.map(jnp.shape, variables["batch_stats"])
    {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 3)}
  """
  layer_instance: nn.Module
  n_steps: int = 1
  epsilon: float = 1e-12
  dtype: Any = None
  param_dtype: Any = jnp.float32
  error_on_non_matrix: bool = False
  collection_name: str = "batch_stats"
  operator_norm: bool = False

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs):
    if self.operator_norm:
      def normalize(vs):
        return self._normalize_operator(vs, args[0], update_stats)
    else:
      def normalize(vs):
        return jax.tree_util.tree_map_with_path(
            lambda path, value: self._normalize(path, value, update_stats), vs)
    return nn.map_variables(lambda layer: layer(*args, **kwargs), trans_in_fn=normalize,
                            init=self.is_initializing(), mutable=True)(self.layer_instance)

  def _power_iteration_state(self, name: str, u_shape: tuple[int, ...]):
    """The ``u`` and ``sigma`` variables of one parameter, drawn as Flax draws them."""
    dtype = checks.reduction_dtype(self.param_dtype)
    initialized = self.has_variable(self.collection_name, name + "/u")
    u = self.variable(self.collection_name, name + "/u", jax.random.normal,
                      None if initialized else self.make_rng("params"), u_shape, dtype)
    sigma = self.variable(self.collection_name, name + "/sigma", jnp.ones, (), dtype)
    return u, sigma

  def _apply(self, value, name, u_shape, update_stats, operator=None):
    u, sigma = self._power_iteration_state(name, u_shape)
    y, new = wn.spectral_norm(
        value, wn.SpectralState(u.value, sigma.value), n_steps=self.n_steps,
        epsilon=self.epsilon, operator=operator,
        dtype=self.dtype or jnp.result_type(value.dtype, self.param_dtype))
    if update_stats:
      u.value, sigma.value = new
    return y

  def _normalize(self, path, value, update_stats: bool):
    value = jnp.asarray(value)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    name = self.layer_instance.name + "/" + "/".join(key.key for key in path[1:])
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(f"{name} is {value.ndim}-d but error_on_non_matrix=True; set it to False "
                       f"to normalize the kernel reshaped to (-1, {value.shape[-1]})")
    return self._apply(value, name, (1, value.shape[-1]), update_stats)

  def _normalize_operator(self, variables, x, update_stats: bool):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
    kernels = [path for path, value in flat.items() if jnp.ndim(value) >= 2]
    if len(kernels) != 1:
      raise ValueError(
          f"SpectralNorm(operator_norm=True) wraps one affine layer with one kernel, but "
          f"{self.layer_instance.name} has {len(kernels)} variables of 2 or more axes "
          f"({['/'.join(p) for p in kernels]}); wrap each convolution in its own SpectralNorm")
    if self.n_steps < 1:
      return variables
    (path,) = kernels
    layer = self.layer_instance.clone(parent=None)

    def operator(kernel, u):
      replaced = traverse_util.unflatten_dict({**flat, path: kernel})
      return layer.apply(replaced, u) - layer.apply(replaced, jnp.zeros_like(u))

    name = self.layer_instance.name + "/" + "/".join(path[1:])
    y = self._apply(flat[path], name, (1, *jnp.shape(x)[1:]), update_stats, operator)
    return traverse_util.unflatten_dict({**flat, path: y})


class StdConv(nn.Conv):
  """``flax.linen.Conv`` with weight standardization (Qiao et al. 2019), as BiT's convolutions.

  The kernel is standardized over every axis but the last (:func:`jaxnorm.weight_standardize`)
  before each call; it is stored as ``params/kernel``, so a ``Conv`` checkpoint loads. Pair
  it with ``GroupNorm`` for training with small batches.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> conv = jnn.StdConv(4, (3, 3), use_bias=False)
    >>> conv.init_with_output(jax.random.key(0), jnp.ones((1, 5, 5, 2)))[0].shape
    (1, 5, 5, 4)
  """
  epsilon: float = 1e-5

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return self.standardize(value) if name == "kernel" else value

  def standardize(self, kernel):
    return wn.weight_standardize(kernel, epsilon=self.epsilon)


class ScaledStdConv(StdConv):
  """``flax.linen.Conv`` with the scaled weight standardization of NF-Nets (Brock et al. 2021).

  :func:`jaxnorm.scaled_weight_standardize` with a learned ``params/gain`` per output feature
  (initialized by ``gain_init``, ones) and the constant ``gamma``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> conv = jnn.ScaledStdConv(4, (3, 3), gamma=1.7139)
    >>> sorted(conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))["params"])
    ['bias', 'gain', 'kernel']
  """
  gamma: float = 1.0
  epsilon: float = 1e-4
  gain_init: Initializer = initializers.ones

  def standardize(self, kernel):
    gain = self.param("gain", self.gain_init, (kernel.shape[-1],), self.param_dtype)
    return wn.scaled_weight_standardize(kernel, gain, gamma=self.gamma, epsilon=self.epsilon,
                                        dtype=kernel.dtype)


class FilterResponseNorm(nn.Module):
  """Filter response normalization with TLU (Singh and Krishnan 2020), channels last.

  :func:`jaxnorm.filter_response_norm` over ``reduction_axes`` (default: every axis but the
  first and the last), then ``scale``, ``bias`` and, with ``use_tlu``, ``max(y, tau)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> variables = jnn.FilterResponseNorm().init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    >>> sorted(variables["params"])
    ['bias', 'scale', 'tau']
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  use_tlu: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros
  reduction_axes: Axes = None

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "FilterResponseNorm")
    scale, bias = scale_and_bias(
        self, (x.shape[-1],), use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    y = rn.filter_response_norm(x, scale, bias, epsilon=self.epsilon, axes=self.reduction_axes,
                                where=mask, dtype=self.dtype)
    if self.use_tlu:
      tau = self.param("tau", self.tau_init, (x.shape[-1],), self.param_dtype)
      y = rn.tlu(y, tau.astype(y.dtype))
    return y


class TLU(nn.Module):
  """Thresholded linear unit ``max(x, tau)``, a learned ``params/tau`` per channel.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> jnn.TLU().init_with_output(jax.random.key(0), jnp.array([[-1.0, 2.0]]))[0]
    Array([[0., 2.]], dtype=float32)
  """
  param_dtype: Any = jnp.float32
  tau_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x):
    x = checks.float_input(x, "TLU")
    return rn.tlu(x, self.param("tau", self.tau_init, (x.shape[-1],), self.param_dtype))


class EvoNormS0(nn.Module):
  """EvoNorm-S0 (Liu et al. 2020), batch-independent, as timm's ``EvoNorm2dS0``.

  :func:`jaxnorm.evonorm_s0` with ``params/scale``, ``params/bias`` and ``params/v``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.EvoNormS0(num_groups=2)
    >>> layer.init_with_output(jax.random.key(0), jnp.ones((1, 3, 3, 4)))[0].shape
    (1, 3, 3, 4)
  """
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  v_init: Initializer = initializers.ones

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = checks.float_input(x, "EvoNormS0")
    scale, bias = scale_and_bias(
        self, (x.shape[-1],), use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    v = self.param("v", self.v_init, (x.shape[-1],), self.param_dtype)
    return rn.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups,
                         group_size=self.group_size, epsilon=self.epsilon, where=mask,
                         dtype=self.dtype)


class EvoNormB0(nn.Module):
  """EvoNorm-B0 (Liu et al. 2020), as timm's ``EvoNorm2dB0``, with a running variance.

  :func:`jaxnorm.evonorm_b0`; ``batch_stats/var`` (float32) moves in training as batch norm's,
  never while initializing; ``use_running_average`` as in ``BatchNorm``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.EvoNormB0(use_running_average=False)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3, 3, 4)))
    >>> variables["batch_stats"]["var"]
    Array([1., 1., 1., 1.], dtype=float32)
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-3
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  v_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = checks.float_input(x, "EvoNormB0")
    channels = (x.shape[-1],)
    var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
    scale, bias = scale_and_bias(
        self, channels, use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    v = self.param("v", self.v_init, channels, self.param_dtype)
    training = batch_norm_training(self, x, (x.ndim - 1,), use_running_average)
    y, new_var = rn.evonorm_b0(
        x, var.value, scale, bias, v, training=training, momentum=self.momentum,
        epsilon=self.epsilon, where=mask,
        axis_name=None if self.is_initializing() else self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)
    store_running_stats(self, training, (var,), (new_var,))
    return y
