"""Dataset statistics on the devices: ``device_stats``, jittable, one collective across devices.

Count, mean, variance, minimum and maximum per channel, with :func:`jaxnorm.reduce_moments`'s
shifted moments (float32 or wider) merged across devices by count (Chan's formulas, the merge
of :func:`collectives.pool_moments`). Quantiles stay on the host (:func:`jaxnorm.fit_stats`).
"""
from __future__ import annotations

from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import collectives
from jaxnorm._src import moments as moments_lib
from jaxnorm._src.stats_result import Stats


def device_stats(x: ArrayLike, *, channel_axis: int | None = -1, ignore_nan: bool = False,
                 axis_name: Hashable | None = None) -> Stats:
  """Count, mean, variance, std, min and max per channel of ``x``, over devices with one collective.

  ``x`` keeps its layout: the moments are :func:`jaxnorm.reduce_moments` over every axis but
  the channel axis (shifted, in float32 or wider), and min and max are reduced over the same
  axes. Without ``axis_name``, input sharded over an Explicit mesh (``jax.make_mesh``'s default)
  is reduced shard by shard and pooled with one ``all_gather``, and under sharded ``jit`` over
  an Auto mesh XLA partitions the reductions. With ``axis_name`` (under ``vmap``, ``pmap``,
  ``shard_map``) one ``all_gather`` brings every device's count, mean, variance, minimum and
  maximum to all of them, and they are merged with Chan's formulas weighted by count
  (``stats.merge_moments``, the merge of ``stats.pool_moments``). The result is that of all
  shards together. Jittable; quantiles are left None (use :func:`fit_stats` on the host, and
  :func:`merge_across_processes` across processes).

  Args:
    x: this device's values (or the whole array, sharded or not), channels along
      ``channel_axis``.
    channel_axis: the channel axis; None for one channel over all values.
    ignore_nan: skip NaNs. Unlike :func:`fit_stats`, which raises on a NaN, ``device_stats``
      cannot raise on data (it runs under ``jit``): with ``ignore_nan=False`` a NaN in a channel
      silently makes that channel's mean, var, std, min and max NaN. Check the result (e.g.
      ``jnp.isnan(stats.mean).any()``), or pass ``ignore_nan=True``.
    axis_name: the mapped axis to merge over (under ``vmap``, ``pmap``, ``shard_map``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> shards = jnp.arange(8.0).reshape(2, 4, 1)  # two devices, four values each
    >>> stats = jax.vmap(lambda x: jaxnorm.device_stats(x, axis_name="d"), axis_name="d")(shards)
    >>> stats.mean[0], stats.var[0], stats.max[0]
    (Array([3.5], dtype=float32), Array([5.25], dtype=float32), Array([7.], dtype=float32))
  """
  x = jnp.asarray(x)
  if channel_axis is None:
    x = x.reshape(1) if x.ndim == 0 else x
    axes = tuple(range(x.ndim))
  else:
    if x.ndim == 0:
      raise ValueError(
          f"an array of shape {x.shape} has no channel axis {channel_axis}; give arrays of "
          f"shape (N, ..., C), or channel_axis=None for one channel over all values")
    (channel,) = checks.canonical_axes(channel_axis, x.ndim, name="channel_axis", shape=x.shape)
    axes = tuple(a for a in range(x.ndim) if a != channel)
  # No reshape to (values, channels): x keeps its layout, so input sharded over an Explicit
  # mesh is reduced shard by shard (reduce_moments pools the shards with one all_gather).
  xf = x.astype(checks.reduction_dtype(x.dtype))
  valid = ~jnp.isnan(xf) if ignore_nan else None
  if axis_name is None:
    moments = moments_lib.reduce_moments(xf, axes, where=valid)
  else:
    moments = moments_lib.local_moments(xf, axes, valid)
  low_values = xf if valid is None else jnp.where(valid, xf, jnp.inf)
  high_values = xf if valid is None else jnp.where(valid, xf, -jnp.inf)
  lo = jnp.min(low_values, axis=axes, keepdims=True, initial=jnp.inf)
  hi = jnp.max(high_values, axis=axes, keepdims=True, initial=-jnp.inf)
  if axis_name is not None:
    moments, lo, hi = _pool(moments, lo, hi, axis_name)

  def per_channel(a: Array) -> Array:
    a = jnp.broadcast_to(a, lo.shape) if a.shape != lo.shape else a
    a = jnp.squeeze(a, axis=axes)
    return a.reshape(1) if channel_axis is None else a

  var = per_channel(moments.var)
  # Integer counts, as fit_stats gives them (int32, or int64 under jax_enable_x64).
  count = jnp.round(per_channel(moments.count)).astype(jnp.asarray(0).dtype)
  return Stats(count=count, mean=per_channel(moments.mean), var=var,
               std=jnp.sqrt(var), min=per_channel(lo), max=per_channel(hi),
               channel_axis=channel_axis, ignore_nan=ignore_nan)


def _pool(local: moments_lib.Moments, lo: Array, hi: Array, axis_name: Hashable):
  """One all_gather of every device's moments, minimum and maximum, then the count-weighted merge.

  The merge is that of :func:`collectives.pool_moments` (:func:`collectives.merge_moments`).
  """
  packed = jnp.stack(list(local) + [lo, hi])
  gathered = collectives.gather(packed, axis_name)
  merged = collectives.merge_moments(moments_lib.Moments(*(gathered[:, i] for i in range(4))))
  return merged, jnp.min(gathered[:, 4], axis=0), jnp.max(gathered[:, 5], axis=0)
