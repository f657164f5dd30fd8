"""Adaptive and conditional norms of generative models, as pure functions.

A conditioning signal (a class label, a style image, a diffusion timestep's embedding) sets the
scale and shift of a normalized activation, per example:

- :func:`film`: feature-wise affine modulation (Perez et al. 2018).
- :func:`ada_layer_norm`: layer (or RMS) norm without parameters, then modulated; and
  :func:`ada_ln_zero`, DiT's AdaLN-Zero (Peebles and Xie 2023), which projects the conditioning
  vector to shift, scale and a gate.
- :func:`conditional_batch_norm`: batch norm with per-class scale and bias, on the batch-norm
  engine (masks, sync over devices, running statistics).
- :func:`adain`: adaptive instance normalization (Huang and Belongie 2017).

The statistics come from the engine (stable at any offset, float32 or wider); the modulation is
elementwise and XLA fuses it into the normalizing pass.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import normalize
from jaxnorm._src.moments import AxisName, Groups
from jaxnorm._src.transformer_norms import norm_kind


def per_example(param: ArrayLike, shape: tuple[int, ...], name: str, axis: int = -1) -> Array:
  """A per-(example, channel) parameter of shape ``(batch, channels)`` at x's rank.

  Batch is axis 0 and the channels ``axis``; ``(1, channels)`` and ``(channels,)`` broadcast
  over the batch. Returns shape ``(batch or 1, 1, ..., channels, ..., 1)``.
  """
  param = jnp.asarray(param)
  axis = axis % len(shape)
  batch, channels = shape[0], shape[axis]
  if param.ndim == 1 and param.shape == (channels,):
    param = param[None]
  if param.ndim == 2 and param.shape[0] in (1, batch) and param.shape[1] == channels:
    return param.reshape([param.shape[0] if a == 0 else channels if a == axis else 1
                          for a in range(len(shape))])
  raise ValueError(
      f"{name} of shape {param.shape} does not fit x.shape={tuple(shape)}: give one row per "
      f"example and one column per channel, shape ({batch}, {channels}) (or ({channels},) for "
      f"every example)")


def batched_input(x: ArrayLike, name: str) -> Array:
  """``x`` as a float array of at least (batch, channels)."""
  x = checks.float_input(x, name)
  if x.ndim < 2:
    raise ValueError(f"{name} needs x of shape (batch, ..., channels); got {x.shape}: add a "
                     f"batch axis, e.g. x[None]")
  return x


def film(x: ArrayLike, scale: ArrayLike, shift: ArrayLike, *, scale_offset: float = 0.0,
         dtype: Any = None) -> Array:
  """Feature-wise linear modulation (Perez et al. 2018, "FiLM"), channels last.

  .. math:: y_{n,\\dots,c} = (o + \\gamma_{n,c})\\, x_{n,\\dots,c} + \\beta_{n,c}

  Args:
    x: ``(batch, ..., channels)``.
    scale, shift: :math:`\\gamma, \\beta` of shape ``(batch, channels)``, from the conditioning.
    scale_offset: :math:`o`; 1.0 when the generator predicts :math:`\\gamma - 1`, so that an
      output near 0 leaves ``x`` as it is.
    dtype: output dtype (default: result type of x, scale and shift).

  Returns:
    ``y``, of x's shape.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.ones((2, 3, 1))
    >>> jaxnorm.film(x, jnp.array([[2.0], [0.0]]), jnp.array([[0.0], [5.0]]))[:, 0]
    Array([[2.],
           [5.]], dtype=float32)
  """
  x = batched_input(x, "film")
  gamma, beta = per_example(scale, x.shape, "scale"), per_example(shift, x.shape, "shift")
  out_dtype = dtype or jnp.result_type(x, gamma, beta)
  wide = checks.reduction_dtype(out_dtype)
  y = x.astype(wide) * (gamma.astype(wide) + scale_offset) + beta.astype(wide)
  return y.astype(out_dtype)


def ada_layer_norm(x: ArrayLike, shift: ArrayLike, scale: ArrayLike, *, kind: str = "layer",
                   epsilon: float = 1e-6, where: ArrayLike | None = None,
                   dtype: Any = None) -> Array:
  """Adaptive layer norm: ``x`` normalized over its channels, then modulated per example.

  .. math:: y_{n,\\dots,c} = \\hat x_{n,\\dots,c}\\,(1 + s_{n,c}) + b_{n,c}

  DiT's ``modulate(norm(x), shift, scale)`` (Peebles and Xie 2023), with :math:`\\hat x` the
  layer norm of each position over its channels without parameters (``kind="rms"``: the RMS
  norm), its statistics stable at any offset.

  Args:
    x: ``(batch, ..., channels)``, e.g. ``(batch, tokens, features)``.
    shift, scale: :math:`b, s` of shape ``(batch, channels)``.
    kind: ``"layer"`` or ``"rms"``.
    epsilon: added to the variance.
    where: optional mask broadcastable to ``x`` for the statistics.
    dtype: output dtype (default: result type of x, shift and scale).

  Returns:
    ``y``, of x's shape.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[[1e4 + 1.0, 1e4 - 1.0]]])
    >>> jaxnorm.ada_layer_norm(x, jnp.array([[0.0, 3.0]]), jnp.array([[1.0, 1.0]]), epsilon=0.0)
    Array([[[2., 1.]]], dtype=float32)
  """
  x = batched_input(x, "ada_layer_norm")
  beta, gamma = per_example(shift, x.shape, "shift"), per_example(scale, x.shape, "scale")
  out_dtype = dtype or jnp.result_type(x, beta, gamma)
  wide = checks.reduction_dtype(x.dtype)
  rms = norm_kind(kind, "ada_layer_norm") == "rms"
  norm = functional.rms_norm if rms else functional.layer_norm
  xhat = norm(x, epsilon=epsilon, where=where, dtype=wide)
  return (xhat * (1 + gamma.astype(wide)) + beta.astype(wide)).astype(out_dtype)


def modulation(condition: ArrayLike, kernel: ArrayLike, bias: ArrayLike | None, *,
               chunks: int, channels: int, activation: Callable | None,
               name: str) -> list[Array]:
  """``activation(condition) @ kernel + bias``, split into ``chunks`` arrays of ``channels``."""
  condition, kernel = jnp.asarray(condition), jnp.asarray(kernel)
  if condition.ndim != 2:
    raise ValueError(f"{name}: condition of shape {condition.shape} must be (batch, width), one "
                     f"conditioning vector per example")
  if kernel.ndim != 2 or kernel.shape[0] != condition.shape[1]:
    raise ValueError(
        f"{name}: condition of width {condition.shape[1]} (shape {condition.shape}) does not "
        f"match kernel.shape={kernel.shape}, which takes width {kernel.shape[0]}; pass "
        f"conditioning vectors of width {kernel.shape[0]}, or a kernel of shape "
        f"({condition.shape[1]}, {chunks * channels}) (a layer takes the width of the first "
        f"call: build it anew for another width)")
  if kernel.shape[1] != chunks * channels:
    raise ValueError(
        f"{name}: kernel.shape={kernel.shape} projects to {kernel.shape[1]} values, but x has "
        f"{channels} channels and needs {chunks} * {channels} = {chunks * channels}; give a "
        f"kernel of shape ({kernel.shape[0]}, {chunks * channels})")
  hidden = condition if activation is None else activation(condition)
  projected = jnp.dot(hidden, kernel)
  if bias is not None:
    projected = projected + bias
  return jnp.split(projected, chunks, axis=-1)


def ada_ln_zero(x: ArrayLike, condition: ArrayLike, kernel: ArrayLike,
                bias: ArrayLike | None = None, *, kind: str = "layer", epsilon: float = 1e-6,
                activation: Callable | None = jax.nn.silu, where: ArrayLike | None = None,
                dtype: Any = None) -> tuple[Array, Array]:
  """AdaLN-Zero (Peebles and Xie 2023, DiT): shift, scale and gate from a conditioning vector.

  .. math:: (b, s, g) = \\operatorname{SiLU}(c)\\, W + w_0, \\qquad
     y = \\hat x\\,(1 + s) + b

  and the block adds ``gate * branch(y)`` to its residual stream. With the projection
  :math:`W, w_0` initialized to zeros (the layers do), :math:`s = b = g = 0`: every block starts
  as the identity, as the paper's best variant.

  Args:
    x: ``(batch, ..., channels)``.
    condition: ``(batch, width)``, e.g. the sum of timestep and class embeddings.
    kernel: :math:`W` of shape ``(width, 3 * channels)``: shift, scale, gate in that order.
    bias: optional :math:`w_0` of shape ``(3 * channels,)``.
    kind, epsilon, where: as :func:`ada_layer_norm`.
    activation: applied to ``condition`` first (DiT: SiLU), or None.
    dtype: output dtype of ``y`` (default: result type of x and the modulation).

  Returns:
    ``(y, gate)``, ``gate`` of shape ``(batch, 1, ..., channels)`` to multiply the branch
    output by.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x, c = jnp.array([[[3.0, 1.0]]]), jnp.ones((1, 4))
    >>> y, gate = jaxnorm.ada_ln_zero(x, c, jnp.zeros((4, 6)), epsilon=0.0)
    >>> y, gate
    (Array([[[ 1., -1.]]], dtype=float32), Array([[[0., 0.]]], dtype=float32))
  """
  x = batched_input(x, "ada_ln_zero")
  shift, scale, gate = modulation(condition, kernel, bias, chunks=3, channels=x.shape[-1],
                                  activation=activation, name="ada_ln_zero")
  y = ada_layer_norm(x, shift, scale, kind=kind, epsilon=epsilon, where=where, dtype=dtype)
  return y, per_example(gate, x.shape, "condition")


def class_rows(table: Array, labels: ArrayLike, num_examples: int, name: str) -> Array:
  """The rows of ``table`` (num_classes, channels) for each label, checked.

  Concrete labels out of ``[0, num_classes)`` raise; under ``jit`` they give NaN rows (jnp's
  default would clamp to a wrong class in silence).
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}; "
                    f"for one-hot labels pass labels.argmax(-1)")
  if labels.shape != (num_examples,):
    raise ValueError(f"{name}: labels of shape {labels.shape} must hold one class per example, "
                     f"shape ({num_examples},)")
  num_classes = table.shape[0]
  try:
    values = np.asarray(labels)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None
  if values is not None and values.size and (values.min() < 0 or values.max() >= num_classes):
    bad = values[(values < 0) | (values >= num_classes)]
    raise ValueError(
        f"{name}: labels hold {bad[:5].tolist()}, out of range for the {num_classes} classes of "
        f"scale.shape={table.shape}; labels must lie in [0, {num_classes}): give "
        f"num_classes={max(int(values.max()) + 1, num_classes)} (a scale and bias of that many "
        f"rows), or map the labels into range")
  return jnp.take(table, labels, axis=0, mode="fill", fill_value=jnp.nan)


def conditional_batch_norm(x: ArrayLike, labels: ArrayLike, running: bn.BatchStats | None,
                           scale: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                           training: bool, axis: int = -1, momentum: float = 0.99,
                           epsilon: float = 1e-5, where: ArrayLike | None = None,
                           axis_name: AxisName | None = None, axis_index_groups: Groups = None,
                           dtype: Any = None) -> tuple[Array, bn.BatchStats | None]:
  """Conditional batch norm: batch norm with a scale and bias per class, chosen per example.

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_c}{\\sqrt{\\sigma^2_c + \\epsilon}}
     \\, \\gamma_{l_n,c} + \\beta_{l_n,c}

  The statistics are those of :func:`jaxnorm.batch_norm` (shared by every class: masks, sync
  over ``axis_name``, running statistics and their guard); only the affine depends on the label
  :math:`l_n` (de Vries et al. 2017; Miyato and Koyama 2018 in class-conditional GANs).

  Args:
    x: ``(batch, ..., channels)`` with the batch first and the channels at ``axis``.
    labels: integer class of each example, shape ``(batch,)``.
    running: :class:`jaxnorm.BatchStats` of the channel shape, or None in training.
    scale, bias: per-class :math:`\\gamma, \\beta` of shape ``(num_classes, channels)``.
    training, momentum, epsilon, where, axis_name, axis_index_groups: as
      :func:`jaxnorm.batch_norm`.
    axis: the channel axis (one axis, not the batch's).
    dtype: output dtype (default: result type of x, scale and bias).

  Returns:
    ``(y, next_running)``.

  Raises:
    ValueError: labels out of range (when they are concrete; under ``jit`` those examples'
      outputs are NaN), or parameters not ``(num_classes, channels)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x, labels = jnp.array([[1.0], [3.0]]), jnp.array([0, 1])
    >>> y, _ = jaxnorm.conditional_batch_norm(x, labels, None, jnp.array([[1.0], [10.0]]),
    ...                                       training=True, epsilon=0.0)
    >>> y.ravel()
    Array([-1., 10.], dtype=float32)
  """
  x = batched_input(x, "conditional_batch_norm")
  axis = checks.canonical_axes(axis, x.ndim, name="axis", shape=x.shape)
  if len(axis) != 1 or axis[0] == 0:
    raise ValueError(f"conditional_batch_norm: axis={axis} must be one channel axis other than "
                     f"the batch (axis 0) of x.shape={x.shape}")
  channels = x.shape[axis[0]]
  params = []
  for param_name, param in (("scale", scale), ("bias", bias)):
    if param is None:
      params.append(None)
      continue
    param = jnp.asarray(param)
    if param.ndim != 2 or param.shape[1] != channels:
      raise ValueError(
          f"conditional_batch_norm: {param_name} of shape {param.shape} must be (num_classes, "
          f"{channels}), one row per class for the {channels} channels of x.shape={x.shape}")
    rows = class_rows(param, labels, x.shape[0], "conditional_batch_norm")
    params.append(per_example(rows, x.shape, param_name, axis[0]))
  out_dtype = dtype or jnp.result_type(x, *(p for p in params if p is not None))
  wide = checks.reduction_dtype(x.dtype)
  xhat, running = bn.batch_norm(x, running, None, None, training=training, axis=axis,
                                momentum=momentum, epsilon=epsilon, where=where,
                                axis_name=axis_name, axis_index_groups=axis_index_groups,
                                dtype=wide)
  gamma, beta = params
  y = xhat if gamma is None else xhat * gamma.astype(wide)
  y = y if beta is None else y + beta.astype(wide)
  return y.astype(out_dtype), running


def adain(content: ArrayLike, style: ArrayLike, *, epsilon: float = 1e-5,
          where: ArrayLike | None = None, style_where: ArrayLike | None = None,
          dtype: Any = None) -> Array:
  """Adaptive instance normalization (Huang and Belongie 2017), channels last.

  .. math:: y_{n,\\dots,c} = \\sigma_{n,c}(s)\\, \\frac{x_{n,\\dots,c} - \\mu_{n,c}(x)}
     {\\sqrt{\\sigma^2_{n,c}(x) + \\epsilon}} + \\mu_{n,c}(s), \\qquad
     \\sigma_{n,c}(s) = \\sqrt{\\sigma^2_{n,c}(s) + \\epsilon}

  Each example and channel of the content takes the mean and standard deviation of the style
  over its spatial axes (every axis but the first and the last). The variances are the
  population ones (the paper's code takes the unbiased variance, a factor ``n / (n - 1)``);
  both come from the stable moments, so content or style far from zero stays exact. The
  gradient flows into both.

  Args:
    content: ``(batch, *spatial, channels)``.
    style: ``(batch or 1, *spatial', channels)``: spatial sizes may differ from the content's.
    epsilon: added to both variances.
    where, style_where: optional masks of the valid content and style positions.
    dtype: output dtype (default: result type of content and style).

  Returns:
    The stylized content, of its shape.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> content = jnp.array([[[1.0], [3.0]]])            # (1, 2, 1)
    >>> style = jnp.array([[[1e4 - 2.0], [1e4 + 2.0]]])  # mean 1e4, std 2
    >>> jaxnorm.adain(content, style, epsilon=0.0)
    Array([[[ 9998.],
            [10002.]]], dtype=float32)
  """
  content = checks.float_input(content, "adain")
  style = checks.float_input(style, "adain")
  if content.ndim < 3 or style.ndim != content.ndim:
    raise ValueError(
        f"adain needs content and style of one rank with spatial axes, (batch, *spatial, "
        f"channels); got content.shape={content.shape} and style.shape={style.shape}")
  if style.shape[-1] != content.shape[-1] or style.shape[0] not in (1, content.shape[0]):
    raise ValueError(
        f"adain: style.shape={style.shape} does not fit content.shape={content.shape}; the "
        f"style needs the content's {content.shape[-1]} channels (last axis) and a batch of "
        f"{content.shape[0]} or 1")
  spatial = tuple(range(1, content.ndim - 1))
  content_moments = moments_lib.pooled_moments(
      content, spatial, checks.broadcast_mask(where, content.shape), None)
  style_moments = moments_lib.pooled_moments(
      style, spatial, checks.broadcast_mask(style_where, style.shape), None)
  style_std = jnp.sqrt(style_moments.var + epsilon)
  return normalize.normalize_with(
      content, content_moments, style_std, style_moments.mean,
      feature_axes=(0, content.ndim - 1), epsilon=epsilon,
      dtype=dtype or jnp.result_type(content, style))
