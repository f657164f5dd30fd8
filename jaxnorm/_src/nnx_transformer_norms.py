"""Flax NNX layers for transformers and generative models, thin over the pure functions.

The same parameters, under the same names, as the Linen layers of
:mod:`jaxnorm._src.linen_transformer_norms`.

Using QK-norm with flax's own attention: build ``nnx.MultiHeadAttention(..., normalize_qk=True)``
and replace its norms, which it calls on ``(batch, seq, heads, head_dim)``::

    attention.query_ln = jnnx.HeadNorm(head_dim, num_heads, kind="rms")
    attention.key_ln = jnnx.HeadNorm(head_dim, num_heads, kind="rms")
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jaxnorm._src import checks
from jaxnorm._src import conditional_norms as conditional
from jaxnorm._src import transformer_norms as transformer
from jaxnorm._src.nnx_batch_norms import BatchNorm
from jaxnorm._src.nnx_common import (NO_METADATA, Initializer, check_features, feature_shape_of,
                                     param, scale_and_bias, value)
from jaxnorm._src.nnx_norms import LayerNorm, RMSNorm


class HeadNorm(nnx.Module):
  """Layer or RMS norm of each head over ``head_dim``: one half of QK-norm.

  .. math:: y_{\\dots,h,:} = \\operatorname{norm}(x_{\\dots,h,:}) \\cdot (\\gamma_h + o)

  ``scale`` is ``(head_dim,)``, or ``(num_heads, head_dim)`` when ``num_heads`` is given
  (:func:`jaxnorm.head_norm`). Fits ``nnx.MultiHeadAttention``'s ``query_ln`` and ``key_ln``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.HeadNorm(4, kind="rms", epsilon=0.0)(jnp.array([[[4.0, 0.0, 0.0, 0.0]]]))
    Array([[[2., 0., 0., 0.]]], dtype=float32)
  """

  def __init__(self, head_dim: int, num_heads: int | None = None, *, kind: str = "layer",
               epsilon: float = 1e-6, dtype: Any = None, param_dtype: Any = jnp.float32,
               use_scale: bool = True, scale_init: Initializer = initializers.ones_init(),
               scale_offset: float = 0.0, rngs: nnx.Rngs | None = None,
               scale_metadata: Mapping[str, Any] = NO_METADATA):
    shape = (head_dim,) if num_heads is None else (num_heads, head_dim)
    self.scale, _ = scale_and_bias(shape, use_scale=use_scale, use_bias=False,
                                   scale_init=scale_init, bias_init=None,
                                   param_dtype=param_dtype, rngs=rngs,
                                   scale_metadata=scale_metadata, bias_metadata=NO_METADATA)
    self.head_dim, self.num_heads = head_dim, num_heads
    self.kind = transformer.norm_kind(kind, "HeadNorm")
    self.epsilon, self.dtype, self.param_dtype = epsilon, dtype, param_dtype
    self.use_scale, self.scale_offset = use_scale, scale_offset

  def __call__(self, x):
    """Normalizes ``x`` (..., heads, head_dim) per head."""
    x = checks.float_input(x, "HeadNorm")
    if x.ndim < 1 or x.shape[-1] != self.head_dim:
      raise ValueError(
          f"HeadNorm(head_dim={self.head_dim}) got x.shape={x.shape}, whose last axis is not "
          f"head_dim {self.head_dim}; build the layer with head_dim={x.shape[-1] if x.ndim else 1}"
          f", or give x the shape (..., heads, {self.head_dim})")
    if self.num_heads is not None and (x.ndim < 2 or x.shape[-2] != self.num_heads):
      raise ValueError(
          f"HeadNorm(num_heads={self.num_heads}) holds one scale per head but got x.shape="
          f"{x.shape}; give x the shape (..., {self.num_heads}, {self.head_dim}), or build the "
          f"layer with num_heads=None for a scale shared by every head")
    return transformer.head_norm(x, value(self.scale), kind=self.kind, epsilon=self.epsilon,
                                 scale_offset=self.scale_offset, dtype=self.dtype)


class QKNorm(nnx.Module):
  """QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): normalizes queries and keys.

  ``__call__(query, key)`` on ``(batch, seq, heads, head_dim)`` (:func:`jaxnorm.qk_norm`).
  ``num_heads`` gives one scale per head (``num_kv_heads`` for the keys, default
  ``num_heads``); None shares one. State ``query_norm.scale`` and ``key_norm.scale``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> norm = jnnx.QKNorm(8, num_heads=4, num_kv_heads=2)
    >>> q, k = norm(jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 2, 8)))
    >>> norm.query_norm.scale.shape, norm.key_norm.scale.shape
    ((4, 8), (2, 8))
  """

  def __init__(self, head_dim: int, num_heads: int | None = None,
               num_kv_heads: int | None = None, **kwargs):
    self.query_norm = HeadNorm(head_dim, num_heads, **kwargs)
    self.key_norm = HeadNorm(head_dim, num_kv_heads or num_heads, **kwargs)

  def __call__(self, query, key):
    """``(query, key)`` normalized per head."""
    query = checks.float_input(query, "QKNorm")
    key = checks.float_input(key, "QKNorm")
    transformer.check_query_key(query, key)
    return self.query_norm(query), self.key_norm(key)


class Projection(nnx.Module):
  """``kernel`` (condition_features, out_features) and ``bias``: the conditioning projection."""

  def __init__(self, condition_features: int, out_features: int, *, use_bias: bool,
               kernel_init: Initializer, bias_init: Initializer, param_dtype: Any,
               rngs: nnx.Rngs | None):
    self.kernel = param(kernel_init, (condition_features, out_features), param_dtype, rngs,
                        NO_METADATA, "kernel")
    self.bias = (param(bias_init, (out_features,), param_dtype, rngs, NO_METADATA, "bias")
                 if use_bias else nnx.data(None))


class FiLM(Projection):
  """FiLM (Perez et al. 2018): scale and shift of each channel from a conditioning vector.

  ``__call__(x, condition)`` as ``jaxnorm.linen.FiLM``: ``kernel`` of shape
  ``(condition_features, 2 * num_features)``, ``bias``; ``scale_offset`` 1.0 by default.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> from flax import nnx
    >>> film = jnnx.FiLM(3, 5, kernel_init=nnx.initializers.zeros_init())
    >>> film(jnp.ones((2, 3)), jnp.ones((2, 5)))
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """

  def __init__(self, num_features: int, condition_features: int, *, scale_offset: float = 1.0,
               use_bias: bool = True,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = initializers.zeros_init(),
               param_dtype: Any = jnp.float32, dtype: Any = None,
               rngs: nnx.Rngs | None = None):
    super().__init__(condition_features, 2 * num_features, use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs)
    self.num_features, self.scale_offset, self.dtype = num_features, scale_offset, dtype

  def __call__(self, x, condition):
    """``x`` scaled and shifted per example and channel."""
    x = conditional.batched_input(x, "FiLM")
    scale, shift = conditional.modulation(condition, self.kernel[...], value(self.bias),
                                          chunks=2, channels=x.shape[-1], activation=None,
                                          name="FiLM")
    return conditional.film(x, scale, shift, scale_offset=self.scale_offset, dtype=self.dtype)


class AdaLNZero(Projection):
  """AdaLN-Zero (Peebles and Xie 2023, DiT): norm modulated by a conditioning vector, and a gate.

  ``__call__(x, condition)`` returns ``(y, gate)`` as ``jaxnorm.linen.AdaLNZero``; the
  projection (``kernel`` ``(condition_features, 3 * num_features)``, ``bias``) starts at zeros.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> y, gate = jnnx.AdaLNZero(2, 4, epsilon=0.0)(jnp.array([[[3.0, 1.0]]]), jnp.ones((1, 4)))
    >>> y, gate
    (Array([[[ 1., -1.]]], dtype=float32), Array([[[0., 0.]]], dtype=float32))
  """

  def __init__(self, num_features: int, condition_features: int, *, kind: str = "layer",
               epsilon: float = 1e-6, activation: Callable | None = jax.nn.silu,
               use_bias: bool = True, kernel_init: Initializer = initializers.zeros_init(),
               bias_init: Initializer = initializers.zeros_init(),
               param_dtype: Any = jnp.float32, dtype: Any = None,
               rngs: nnx.Rngs | None = None):
    super().__init__(condition_features, 3 * num_features, use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs)
    self.num_features, self.kind, self.epsilon = num_features, kind, epsilon
    self.activation, self.dtype = activation, dtype

  def __call__(self, x, condition, *, mask=None):
    """``(y, gate)``: ``x`` normalized and modulated, and the gate of the branch."""
    return conditional.ada_ln_zero(x, condition, self.kernel[...], value(self.bias),
                                   kind=self.kind, epsilon=self.epsilon,
                                   activation=self.activation, where=mask, dtype=self.dtype)


class ConditionalBatchNorm(BatchNorm):
  """Batch norm with a scale and bias per class (:func:`jaxnorm.conditional_batch_norm`).

  :class:`BatchNorm`'s arguments and state (``mean``, ``var``), with ``scale`` and ``bias`` of
  shape ``(num_classes, num_features)``; ``__call__(x, labels, use_running_average=None, *,
  mask=None)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.ConditionalBatchNorm(2, 3, momentum=0.9)
    >>> y = layer(jnp.arange(8.0).reshape(4, 2), jnp.array([0, 1, 2, 0]))
    >>> layer.scale.shape, layer.mean[...]
    ((3, 2), Array([0.3, 0.4], dtype=float32))
  """

  def __init__(self, num_features: int, num_classes: int, *, use_bias: bool = True,
               use_scale: bool = True, bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None,
               bias_metadata: Mapping[str, Any] = NO_METADATA,
               scale_metadata: Mapping[str, Any] = NO_METADATA, **kwargs):
    super().__init__(num_features, use_bias=False, use_scale=False, param_dtype=param_dtype,
                     rngs=rngs, **kwargs)
    table = (num_classes,) + feature_shape_of(num_features)
    self.scale, self.bias = scale_and_bias(
        table, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.use_scale, self.use_bias, self.num_classes = use_scale, use_bias, num_classes

  def __call__(self, x, labels, use_running_average: bool | None = None, *,
               mask=None):  # pylint: disable=arguments-differ
    """Normalizes ``x`` with the batch's statistics and each example's class parameters."""
    x, feature_axes, training = self._prepare(x, use_running_average)
    y, running = conditional.conditional_batch_norm(
        x, labels, self._running(), value(self.scale), value(self.bias), training=training,
        axis=feature_axes, momentum=self.momentum, epsilon=self.epsilon, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        dtype=self._output_dtype(x))
    if training:
      self._store(running)
    return y


class AddLayerNorm(LayerNorm):
  """Residual add then layer norm: ``__call__(x, residual)`` returns ``(y, h)``.

  :class:`LayerNorm`'s arguments and state, plus ``residual_dtype``
  (:func:`jaxnorm.add_layer_norm`).

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> y, h = jnnx.AddLayerNorm(2, epsilon=0.0)(jnp.array([[1.0, -1.0]]), jnp.array([[1e4, 1e4]]))
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """

  def __init__(self, num_features, *, residual_dtype: Any = None, **kwargs):
    super().__init__(num_features, **kwargs)
    self.residual_dtype = residual_dtype

  def __call__(self, x, residual, *, mask=None):  # pylint: disable=arguments-differ
    """``(y, h)``: ``h = x + residual`` and its layer norm."""
    x = checks.float_input(x, "AddLayerNorm")
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="AddLayerNorm", name="feature_axes")
    return transformer.add_layer_norm(
        x, residual, value(self.scale), value(self.bias), reduction_axes=self.reduction_axes,
        feature_axes=feature_axes, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        residual_dtype=self.residual_dtype, scale_offset=self.scale_offset)


class AddRMSNorm(RMSNorm):
  """Residual add then RMS norm: ``__call__(x, residual)`` returns ``(y, h)``.

  :class:`RMSNorm`'s arguments and state, plus ``residual_dtype`` (:func:`jaxnorm.add_rms_norm`).

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> y, h = jnnx.AddRMSNorm(2, epsilon=0.0)(jnp.array([[1.0, -1.0]]), jnp.array([[2.0, -2.0]]))
    >>> y, h
    (Array([[ 1., -1.]], dtype=float32), Array([[ 3., -3.]], dtype=float32))
  """

  def __init__(self, num_features, *, residual_dtype: Any = None, **kwargs):
    super().__init__(num_features, **kwargs)
    self.residual_dtype = residual_dtype

  def __call__(self, x, residual, mask=None):  # pylint: disable=arguments-differ
    """``(y, h)``: ``h = x + residual`` and its RMS norm."""
    x = checks.float_input(x, "AddRMSNorm")
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="AddRMSNorm", name="feature_axes")
    return transformer.add_rms_norm(
        x, residual, value(self.scale), reduction_axes=self.reduction_axes,
        feature_axes=feature_axes, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        residual_dtype=self.residual_dtype, scale_offset=self.scale_offset)
