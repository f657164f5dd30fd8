"""Flax NNX input layers: fitted dataset statistics held as :class:`InputStat` variables.

Each is the NNX form of the ``jaxnorm.linen`` layer of the same name.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnorm._src import scalers
from jaxnorm._src.nnx_common import Features, feature_shape_of


@nnx.register_variable_name(scalers.INPUT_STATS, overwrite=True)
class InputStat(nnx.Variable):
  """Fitted dataset statistics held by an input layer: constants, never trained or updated.

  Their own variable type, as Linen's ``input_stats`` collection: ``nnx.Optimizer(...,
  wrt=nnx.Param)`` and ``nnx.grad`` leave them alone, ``model.train()`` does not touch them, and
  ``nnx.state(model)`` (so an orbax checkpoint) keeps them.
  """


def fitted_constants(layer: str, stats: Any, num_features: Features | None,
                     channel_axis: int | None, fields: dict[str, tuple[Callable[[Any], Any],
                                                                   float]]) -> list[InputStat]:
  """One :class:`InputStat` per field, from ``stats``, or placeholders a checkpoint restores."""
  if stats is not None:
    return [InputStat(scalers.stat_array(getter(stats))) for getter, _ in fields.values()]
  if num_features is None:
    raise ValueError(
        f"{layer} needs fitted statistics: pass stats=jaxnorm.fit_stats(batches) (or "
        f"jaxnorm.load_stats(path)), or num_features=C to build a model whose statistics a "
        f"checkpoint then restores")
  shape = () if channel_axis is None else feature_shape_of(num_features)
  return [InputStat(jnp.full(shape, placeholder, jnp.float32))
          for _, placeholder in fields.values()]


def constant(variable: InputStat) -> jax.Array:
  return jax.lax.stop_gradient(variable[...])


class Standardize(nnx.Module):
  """Standardizes inputs with fitted statistics: :math:`y = (x - \\mu) / \\sigma` per channel.

  The NNX form of ``jaxnorm.linen.Standardize``: :class:`InputStat` variables ``mean`` and
  ``std`` (float32, float64 under ``jax_enable_x64``) and :func:`jaxnorm.rescale`. A constant
  channel (std 0) gives ``x - mean``.

  Args:
    stats: fitted :class:`jaxnorm.Stats` (:func:`jaxnorm.fit_stats`, :func:`jaxnorm.load_stats`).
    num_features: with ``stats=None``, the number of channels, for a model whose statistics a
      checkpoint restores (they start as mean 0, std 1).
    channel_axis: the channel axis where ``stats`` is None; otherwise ``stats.channel_axis``.
    dtype: output dtype (default float32, or the input's float dtype).

  Example:
    >>> import numpy as np, jaxnorm, jaxnorm.nnx as jnnx
    >>> x = np.array([[0, 10], [2, 30]], np.uint8)
    >>> layer = jnnx.Standardize(jaxnorm.fit_stats(x))
    >>> layer(x)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> layer.mean[...]
    Array([ 1., 20.], dtype=float32)
  """

  def __init__(self, stats: Any = None, *, num_features: Features | None = None,
               channel_axis: int | None = -1, dtype: Any = None):
    self.channel_axis = stats.channel_axis if stats is not None else channel_axis
    self.mean, self.std = fitted_constants(
        "Standardize", stats, num_features, self.channel_axis,
        {"mean": (lambda s: s.mean, 0.0), "std": (lambda s: s.std, 1.0)})
    self.dtype = dtype

  def __call__(self, x):
    """Standardizes ``x`` (integers, such as uint8 images, become float32)."""
    return scalers.rescale(x, constant(self.mean), constant(self.std),
                           channel_axis=self.channel_axis, dtype=self.dtype)


class MinMaxScale(nnx.Module):
  """Maps each channel's fitted ``[min, max]`` onto ``feature_range``.

  The NNX form of ``jaxnorm.linen.MinMaxScale``: :class:`InputStat` variables ``min`` and
  ``max``; with ``clip``, outputs are clipped to ``feature_range``. A constant channel maps to
  ``feature_range[0]``. Arguments as :class:`Standardize`, plus ``feature_range`` and ``clip``.

  Example:
    >>> import numpy as np, jaxnorm, jaxnorm.nnx as jnnx
    >>> x = np.array([[0, 10], [255, 30]], np.uint8)
    >>> jnnx.MinMaxScale(jaxnorm.fit_stats(x), feature_range=(-1, 1))(x)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """

  def __init__(self, stats: Any = None, *, feature_range: tuple[float, float] = (0.0, 1.0),
               clip: bool = False, num_features: Features | None = None,
               channel_axis: int | None = -1, dtype: Any = None):
    self.feature_range = scalers.check_range(feature_range)
    self.channel_axis = stats.channel_axis if stats is not None else channel_axis
    self.min, self.max = fitted_constants(
        "MinMaxScale", stats, num_features, self.channel_axis,
        {"min": (lambda s: s.min, 0.0), "max": (lambda s: s.max, 1.0)})
    self.clip = clip
    self.dtype = dtype

  def __call__(self, x):
    """Scales ``x`` (integers, such as uint8 images, become float32)."""
    low, high = self.feature_range
    lo, hi = constant(self.min), constant(self.max)
    y = scalers.rescale(x, lo, hi - lo, out_scale=high - low, out_bias=low,
                        channel_axis=self.channel_axis, dtype=self.dtype)
    return jnp.clip(y, low, high) if self.clip else y


class RobustScale(nnx.Module):
  """Centres on the fitted median and divides by the interquantile range ``quantile_range``.

  The NNX form of ``jaxnorm.linen.RobustScale``: :class:`InputStat` variables ``median``,
  ``q_low`` and ``q_high``. A zero range counts as 1. Arguments as :class:`Standardize`, plus
  ``quantile_range`` (percentiles).

  Example:
    >>> import numpy as np, jaxnorm, jaxnorm.nnx as jnnx
    >>> x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    >>> jnnx.RobustScale(jaxnorm.fit_stats(x))(x)[:, 0]
    Array([-1. , -0.5,  0. ,  0.5, 49. ], dtype=float32)
  """

  def __init__(self, stats: Any = None, *,
               quantile_range: tuple[float, float] = (25.0, 75.0),
               num_features: Features | None = None, channel_axis: int | None = -1,
               dtype: Any = None):
    def quantile(i):
      return lambda s: scalers.robust_quantiles(s, quantile_range)[i]
    self.quantile_range = quantile_range
    self.channel_axis = stats.channel_axis if stats is not None else channel_axis
    self.median, self.q_low, self.q_high = fitted_constants(
        "RobustScale", stats, num_features, self.channel_axis,
        {"median": (lambda s: s.median, 0.0), "q_low": (quantile(0), 0.0),
         "q_high": (quantile(1), 1.0)})
    self.dtype = dtype

  def __call__(self, x):
    """Scales ``x`` (integers, such as uint8 images, become float32)."""
    median, q_low, q_high = constant(self.median), constant(self.q_low), constant(self.q_high)
    return scalers.rescale(x, median, q_high - q_low, channel_axis=self.channel_axis,
                           dtype=self.dtype)
