"""Flax Linen layers for transformers and generative models, thin over the pure functions.

Each declares its parameters (and batch statistics) and calls one function of
:mod:`jaxnorm._src.transformer_norms` or :mod:`jaxnorm._src.conditional_norms`.

Using QK-norm with flax's own attention: pass :class:`QKNormAttention` as ``attention_fn``::

    attention = nn.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=jnn.QKNormAttention(kind="rms", per_head=True))

Its scales live in the attention layer under ``attention_fn/query_norm/scale`` and
``attention_fn/key_norm/scale`` (created inside a parent's ``@nn.compact`` method, the parent
holds them, as ``QKNormAttention_0``). ``normalize_qk=True`` (flax's LayerNorm with a shared
scale, ``query_ln/scale``) is ``QKNormAttention()``; move a checkpoint's ``query_ln`` and
``key_ln`` to ``query_norm`` and ``key_norm``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import conditional_norms as conditional
from jaxnorm._src import linen_norms
from jaxnorm._src import transformer_norms as transformer

Initializer = Any


def stored_shape(module: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of parameter ``name`` as stored, or ``shape`` while it does not exist yet.

  Declaring a parameter with its stored shape lets the pure function check the input against
  it and say how to fix the call, where flax would raise a bare shape error.
  """
  if module.has_variable("params", name):
    return tuple(jnp.shape(module.get_variable("params", name)))
  return shape


class HeadNorm(nn.Module):
  """Layer or RMS norm of each head over ``head_dim``: one half of QK-norm.

  .. math:: y_{\\dots,h,:} = \\operatorname{norm}(x_{\\dots,h,:}) \\cdot (\\gamma_h + o)

  On ``(..., heads, head_dim)``; ``scale`` is ``(head_dim,)``, or ``(heads, head_dim)`` with
  ``per_head=True`` (:func:`jaxnorm.head_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> q = jnp.array([[[4.0, 0.0, 0.0, 0.0]]])
    >>> jnn.HeadNorm(kind="rms", epsilon=0.0).init_with_output(jax.random.key(0), q)[0]
    Array([[[2., 0., 0., 0.]]], dtype=float32)
  """
  kind: str = "layer"
  per_head: bool = False
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x):
    x = checks.float_input(x, "HeadNorm")
    scale = None
    if self.use_scale:
      shape = tuple(x.shape[-2:]) if self.per_head else tuple(x.shape[-1:])
      stored = stored_shape(self, "scale", shape)
      if stored[-1] != x.shape[-1]:
        raise ValueError(
            f"HeadNorm's scale has shape {stored}, for head_dim {stored[-1]}, but x.shape="
            f"{x.shape} has head_dim {x.shape[-1]}; initialize the layer anew for head_dim "
            f"{x.shape[-1]}, or project x to head_dim {stored[-1]}")
      scale = self.param("scale", self.scale_init, stored, self.param_dtype)
    return transformer.head_norm(x, scale, kind=self.kind, epsilon=self.epsilon,
                                 scale_offset=self.scale_offset, dtype=self.dtype)


class QKNorm(nn.Module):
  """QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): normalizes queries and keys.

  ``__call__(query, key)`` on ``(batch, seq, heads, head_dim)`` returns both normalized per
  head over ``head_dim`` (:func:`jaxnorm.qk_norm`), with parameters ``query_norm/scale`` and
  ``key_norm/scale``. For flax's attention, see :class:`QKNormAttention`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> q, k = jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 2, 8))
    >>> (q, k), variables = jnn.QKNorm(per_head=True).init_with_output(jax.random.key(0), q, k)
    >>> jax.tree.map(jnp.shape, variables)["params"]
    {'key_norm': {'scale': (2, 8)}, 'query_norm': {'scale': (4, 8)}}
  """
  kind: str = "layer"
  per_head: bool = False
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  scale_offset: float = 0.0

  def norm(self, name: str) -> HeadNorm:
    return HeadNorm(kind=self.kind, per_head=self.per_head, epsilon=self.epsilon,
                    dtype=self.dtype, param_dtype=self.param_dtype, use_scale=self.use_scale,
                    scale_init=self.scale_init, scale_offset=self.scale_offset, name=name)

  @nn.compact
  def __call__(self, query, key):
    query = checks.float_input(query, type(self).__name__)
    key = checks.float_input(key, type(self).__name__)
    transformer.check_query_key(query, key)
    return self.norm("query_norm")(query), self.norm("key_norm")(key)


class QKNormAttention(QKNorm):
  """QK-norm then dot-product attention: an ``attention_fn`` for flax's attention layers.

  ``nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=jnn.QKNormAttention())``
  normalizes queries and keys as :class:`QKNorm` does (``kind``, ``per_head``,
  ``scale_offset``), then calls ``attention`` (default ``flax.linen.dot_product_attention``)
  with the arguments flax passes.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = nn.MultiHeadDotProductAttention(
    ...     num_heads=2, attention_fn=jnn.QKNormAttention(kind="rms", per_head=True))
    >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 3, 8)))
    >>> jax.tree.map(jnp.shape, variables["params"]["attention_fn"])
    {'key_norm': {'scale': (2, 4)}, 'query_norm': {'scale': (2, 4)}}
  """
  attention: Callable[..., jax.Array] = nn.dot_product_attention

  @nn.compact
  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
               dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
               dtype=None, precision=None, module=None, force_fp32_for_softmax: bool = False):
    query = checks.float_input(query, "QKNormAttention")
    key = checks.float_input(key, "QKNormAttention")
    transformer.check_query_key(query, key)
    query, key = self.norm("query_norm")(query), self.norm("key_norm")(key)
    return self.attention(query, key, value, bias=bias, mask=mask,
                          broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                          dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
                          precision=precision, module=module,
                          force_fp32_for_softmax=force_fp32_for_softmax)


def projection(module: nn.Module, condition, out_features: int, *, use_bias: bool,
               kernel_init: Initializer, bias_init: Initializer, param_dtype: Any):
  """Declares ``kernel`` (width, out_features) and ``bias``, at their stored shapes if any."""
  condition = jnp.asarray(condition)
  width = condition.shape[-1] if condition.ndim else 0
  kernel_shape = stored_shape(module, "kernel", (width, out_features))
  kernel = module.param("kernel", kernel_init, kernel_shape, param_dtype)
  bias = (module.param("bias", bias_init, kernel_shape[1:], param_dtype) if use_bias
          else None)
  return kernel, bias


class FiLM(nn.Module):
  """FiLM (Perez et al. 2018): scale and shift of each channel from a conditioning vector.

  ``__call__(x, condition)``: ``(gamma, beta) = condition @ kernel + bias`` (kernel
  ``(width, 2 * channels)``), then :func:`jaxnorm.film` with ``scale_offset`` (default 1.0:
  the projection predicts :math:`\\gamma - 1`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.FiLM(kernel_init=jax.nn.initializers.zeros)
    >>> layer.init_with_output(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((2, 5)))[0]
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  scale_offset: float = 1.0
  use_bias: bool = True
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = initializers.zeros
  param_dtype: Any = jnp.float32
  dtype: Any = None

  @nn.compact
  def __call__(self, x, condition):
    x = conditional.batched_input(x, "FiLM")
    kernel, bias = projection(self, condition, 2 * x.shape[-1], use_bias=self.use_bias,
                              kernel_init=self.kernel_init, bias_init=self.bias_init,
                              param_dtype=self.param_dtype)
    scale, shift = conditional.modulation(condition, kernel, bias, chunks=2,
                                          channels=x.shape[-1], activation=None, name="FiLM")
    return conditional.film(x, scale, shift, scale_offset=self.scale_offset, dtype=self.dtype)


class AdaLNZero(nn.Module):
  """AdaLN-Zero (Peebles and Xie 2023, DiT): norm modulated by a conditioning vector, and a gate.

  ``__call__(x, condition)`` returns ``(y, gate)`` (:func:`jaxnorm.ada_ln_zero`): a DiT block
  is ``x = x + gate * attention(y)``. The projection (``kernel`` ``(width, 3 * channels)``,
  ``bias``) starts at zeros, so every block starts as the identity.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x, c = jnp.array([[[3.0, 1.0]]]), jnp.ones((1, 4))
    >>> (y, gate), _ = jnn.AdaLNZero(epsilon=0.0).init_with_output(jax.random.key(0), x, c)
    >>> y, gate
    (Array([[[ 1., -1.]]], dtype=float32), Array([[[0., 0.]]], dtype=float32))
  """
  kind: str = "layer"
  epsilon: float = 1e-6
  activation: Callable | None = jax.nn.silu
  use_bias: bool = True
  kernel_init: Initializer = initializers.zeros
  bias_init: Initializer = initializers.zeros
  param_dtype: Any = jnp.float32
  dtype: Any = None

  @nn.compact
  def __call__(self, x, condition, *, mask=None):
    x = conditional.batched_input(x, "AdaLNZero")
    kernel, bias = projection(self, condition, 3 * x.shape[-1], use_bias=self.use_bias,
                              kernel_init=self.kernel_init, bias_init=self.bias_init,
                              param_dtype=self.param_dtype)
    return conditional.ada_ln_zero(x, condition, kernel, bias, kind=self.kind,
                                   epsilon=self.epsilon, activation=self.activation,
                                   where=mask, dtype=self.dtype)


class ConditionalBatchNorm(nn.Module):
  """Batch norm with a scale and bias per class (:func:`jaxnorm.conditional_batch_norm`).

  ``__call__(x, labels, use_running_average=None, *, mask=None)``. Variables:
  ``batch_stats/mean`` and ``/var`` of the channel shape, as :class:`BatchNorm`'s (a
  ``BatchNorm`` checkpoint's statistics load), and ``params/scale``, ``params/bias`` of shape
  ``(num_classes, channels)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.ConditionalBatchNorm(num_classes=3, use_running_average=False)
    >>> x, labels = jnp.arange(8.0).reshape(4, 2), jnp.array([0, 1, 2, 0])
    >>> variables = layer.init(jax.random.key(0), x, labels)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'bias': (3, 2), 'scale': (3, 2)}
  """
  num_classes: int
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

  @nn.compact
  def __call__(self, x, labels, use_running_average: bool | None = None, *, mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = conditional.batched_input(x, "ConditionalBatchNorm")
    feature_axes, feature_shape = linen_norms.feature_shape_of(x, self.axis, "axis")
    mean, var = linen_norms.running_stats(self, feature_shape)
    table = (self.num_classes,) + feature_shape
    scale = (self.param("scale", self.scale_init, table, self.param_dtype) if self.use_scale
             else None)
    bias = (self.param("bias", self.bias_init, table, self.param_dtype) if self.use_bias
            else None)
    training = linen_norms.batch_norm_training(self, x, feature_axes, use_running_average)
    initializing = self.is_initializing()
    y, running = conditional.conditional_batch_norm(
        x, labels, bn.BatchStats(mean.value, var.value), scale, bias,
        training=training, axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        where=mask, axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)
    linen_norms.store_running_stats(self, training, (mean, var), running)
    return y


class AddLayerNorm(linen_norms.LayerNorm):
  """Residual add then layer norm: ``__call__(x, residual)`` returns ``(y, h)``.

  :class:`LayerNorm`'s attributes and parameters (``params/scale``, ``params/bias``: a
  ``LayerNorm`` checkpoint loads), plus ``residual_dtype`` (:func:`jaxnorm.add_layer_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x, residual = jnp.array([[1.0, -1.0]]), jnp.array([[1e4, 1e4]])
    >>> (y, h), _ = jnn.AddLayerNorm(epsilon=0.0).init_with_output(jax.random.key(0), x,
    ...                                                            residual)
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """
  residual_dtype: Any = None

  @nn.compact
  def __call__(self, x, residual, *, mask=None):  # pylint: disable=arguments-differ
    x = checks.float_input(x, type(self).__name__)
    feature_axes, feature_shape = linen_norms.feature_shape_of(x, self.feature_axes,
                                                               "feature_axes")
    scale, bias = linen_norms.scale_and_bias(
        self, feature_shape, use_scale=self.use_scale, use_bias=self.use_bias,
        scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype)
    return transformer.add_layer_norm(
        x, residual, scale, bias, reduction_axes=self.reduction_axes,
        feature_axes=feature_axes, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        residual_dtype=self.residual_dtype, scale_offset=self.scale_offset)


class AddRMSNorm(linen_norms.RMSNorm):
  """Residual add then RMS norm: ``__call__(x, residual)`` returns ``(y, h)``.

  :class:`RMSNorm`'s attributes and ``params/scale``, plus ``residual_dtype``
  (:func:`jaxnorm.add_rms_norm`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> x, residual = jnp.array([[1.0, -1.0]]), jnp.array([[2.0, -2.0]])
    >>> (y, h), _ = jnn.AddRMSNorm(epsilon=0.0).init_with_output(jax.random.key(0), x, residual)
    >>> y, h
    (Array([[ 1., -1.]], dtype=float32), Array([[ 3., -3.]], dtype=float32))
  """
  residual_dtype: Any = None

  @nn.compact
  def __call__(self, x, residual, *, mask=None):  # pylint: disable=arguments-differ
    x = checks.float_input(x, type(self).__name__)
    feature_axes, feature_shape = linen_norms.feature_shape_of(x, self.feature_axes,
                                                               "feature_axes")
    scale, _ = linen_norms.scale_and_bias(
        self, feature_shape, use_scale=self.use_scale, use_bias=False,
        scale_init=self.scale_init, bias_init=None, param_dtype=self.param_dtype)
    return transformer.add_rms_norm(
        x, residual, scale, reduction_axes=self.reduction_axes, feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        residual_dtype=self.residual_dtype, scale_offset=self.scale_offset)
