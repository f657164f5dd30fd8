"""Flax Linen input layers holding fitted dataset statistics as constants.

``Standardize``, ``MinMaxScale`` and ``RobustScale`` take a :class:`jaxnorm.Stats` (from
:func:`jaxnorm.fit_stats` or :func:`jaxnorm.load_stats`) and store the numbers they need, in
float32 (float64 under ``jax_enable_x64``), in the ``input_stats`` collection, beside ``params``
and ``batch_stats``:

- not in ``params``: an optimizer never sees them, and ``jax.grad`` over ``params`` has no
  entry for them (the layers also stop gradients through them);
- kept by checkpoints: orbax (or flax.serialization) saves the whole variables dict, so a
  restored model normalizes exactly as the trained one, without the statistics file. A
  checkpoint of ``params`` alone drops them, as it drops ``batch_stats``: save the variables
  (or ``TrainState`` plus ``input_stats``), or keep the JSON of ``Stats.save`` next to it;
- set once, at ``init``: ``apply`` reads them and never updates them, so no ``mutable=`` is
  needed.

Module attributes would not be checkpointed, which is why the numbers are variables. Each layer
declares its variables and calls :func:`jaxnorm.rescale`, the formula of the pure scalers.
Integer input (uint8 images) gives float32 output.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm._src import scalers

COLLECTION = scalers.INPUT_STATS


def fitted_constants(module: nn.Module, stats: Any,
                     fields: dict[str, Callable[[Any], Any]]) -> list[jax.Array]:
  """Declares one ``input_stats`` variable per field, set from ``stats`` at init; no gradient."""
  def initializer(name: str, getter: Callable[[Any], Any]):
    def init():
      if stats is None:
        raise ValueError(
            f"{type(module).__name__} needs fitted statistics to initialize '{COLLECTION}/"
            f"{name}': pass stats=jaxnorm.fit_stats(batches) (or jaxnorm.load_stats(path)), "
            f"or apply it with variables that hold '{COLLECTION}'")
      return scalers.stat_array(getter(stats))
    return init

  return [jax.lax.stop_gradient(module.variable(COLLECTION, name, initializer(name, getter)).value)
          for name, getter in fields.items()]


def _channel_axis(module: nn.Module) -> int | None:
  return module.stats.channel_axis if module.stats is not None else module.channel_axis


class Standardize(nn.Module):
  """Standardizes inputs with fitted statistics: :math:`y = (x - \\mu) / \\sigma` per channel.

  Variables: ``input_stats/mean`` and ``input_stats/std``. A constant channel (std 0) gives
  ``x - mean``.

  Attributes:
    stats: fitted :class:`jaxnorm.Stats`, needed at ``init`` only.
    channel_axis: the channel axis where ``stats`` is None (a model rebuilt to restore a
      checkpoint); otherwise ``stats.channel_axis``.
    dtype: output dtype (default float32, or the input's float dtype).

  Example:
    >>> import jax, numpy as np, jaxnorm, jaxnorm.linen as jnn
    >>> x = np.array([[0, 10], [2, 30]], np.uint8)
    >>> layer = jnn.Standardize(stats=jaxnorm.fit_stats(x))
    >>> y, variables = layer.init_with_output(jax.random.key(0), x)
    >>> y
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> variables["input_stats"]["mean"]
    Array([ 1., 20.], dtype=float32)
  """
  stats: Any = None
  channel_axis: int | None = -1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    mean, std = fitted_constants(self, self.stats, {"mean": lambda s: s.mean,
                                                    "std": lambda s: s.std})
    return scalers.rescale(x, mean, std, channel_axis=_channel_axis(self), dtype=self.dtype)


class MinMaxScale(nn.Module):
  """Maps each channel's fitted ``[min, max]`` onto ``feature_range``.

  Variables: ``input_stats/min`` and ``input_stats/max``. With ``clip``, outputs are clipped to
  ``feature_range``. A constant channel maps to ``feature_range[0]``.

  Example:
    >>> import jax, numpy as np, jaxnorm, jaxnorm.linen as jnn
    >>> x = np.array([[0, 10], [255, 30]], np.uint8)
    >>> layer = jnn.MinMaxScale(stats=jaxnorm.fit_stats(x), feature_range=(-1, 1))
    >>> layer.init_with_output(jax.random.key(0), x)[0]
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  stats: Any = None
  feature_range: tuple[float, float] = (0.0, 1.0)
  clip: bool = False
  channel_axis: int | None = -1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    low, high = scalers.check_range(self.feature_range)
    lo, hi = fitted_constants(self, self.stats, {"min": lambda s: s.min, "max": lambda s: s.max})
    y = scalers.rescale(x, lo, hi - lo, out_scale=high - low, out_bias=low,
                        channel_axis=_channel_axis(self), dtype=self.dtype)
    return jnp.clip(y, low, high) if self.clip else y


class RobustScale(nn.Module):
  """Centres on the fitted median and divides by the interquantile range ``quantile_range``.

  Variables: ``input_stats/median``, ``input_stats/q_low`` and ``input_stats/q_high``. A zero
  range counts as 1.

  Example:
    >>> import jax, numpy as np, jaxnorm, jaxnorm.linen as jnn
    >>> x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    >>> layer = jnn.RobustScale(stats=jaxnorm.fit_stats(x))
    >>> layer.init_with_output(jax.random.key(0), x)[0][:, 0]
    Array([-1. , -0.5,  0. ,  0.5, 49. ], dtype=float32)
  """
  stats: Any = None
  quantile_range: tuple[float, float] = (25.0, 75.0)
  channel_axis: int | None = -1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    def quantile(i):
      return lambda s: scalers.robust_quantiles(s, self.quantile_range)[i]
    median, q_low, q_high = fitted_constants(self, self.stats, {
        "median": lambda s: s.median, "q_low": quantile(0), "q_high": quantile(1)})
    return scalers.rescale(x, median, q_high - q_low, channel_axis=_channel_axis(self),
                           dtype=self.dtype)
