"""Batch normalization (Ioffe and Szegedy 2015) as pure functions with explicit running state.

One skeleton serves the whole family (:func:`batch_norm_family`): the input checks, evaluation
with the running statistics, normalizing a training batch (masks, sync over devices, the folded
output of :func:`normalize.normalize_with`), and the running-statistics update with its guard
against non-finite batches. :func:`batch_norm`, batch renorm, ghost and Lp batch norm each give
only their training statistic (a :class:`TrainingStatistic`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import normalize
from jaxnorm._src.moments import AxisName, Axes, Groups, Moments


class BatchStats(NamedTuple):
  """Running statistics of batch norm, stored as Flax's ``batch_stats/mean`` and ``/var``.

  ``var`` is the running average of the *unbiased* batch variance, as in PyTorch (a batch of
  2 drawn from a variance of 4 contributes 4 on average, not 2), or of the biased one as in
  Flax with ``unbiased_running_var=False``.
  """
  mean: Array
  var: Array


def init_batch_stats(feature_shape: int | tuple[int, ...], dtype: Any = jnp.float32) -> BatchStats:
  """Running statistics before any training: mean 0, variance 1 (as Flax and PyTorch)."""
  return BatchStats(jnp.zeros(feature_shape, dtype), jnp.ones(feature_shape, dtype))


def update_batch_stats(running: BatchStats, batch: Moments, momentum: float, *,
                       var_count: Array | None = None, unbiased: bool = True) -> BatchStats:
  """The next running statistics, an exponential moving average of the batch's.

  .. math::

     \\hat\\mu \\leftarrow m\\,\\hat\\mu + (1 - m)\\,\\mu_B, \\qquad
     \\hat\\sigma^2 \\leftarrow m\\,\\hat\\sigma^2 + (1 - m)\\,\\frac{n}{n - 1}\\sigma^2_B

  A channel keeps its running statistics when the batch's mean or variance is not finite
  (a NaN or Inf in the batch) or when it holds fewer than two valid values (a fully masked
  batch): one bad batch cannot poison them. ``batch`` holds feature-shaped arrays;
  ``var_count`` (default ``batch.count``), the count that must exceed 1 for the variance to
  move (ghost batch norm's: the count where a virtual batch has a degree of freedom).
  With ``unbiased=False`` the biased :math:`\\sigma^2_B` enters instead of
  :math:`\\frac{n}{n-1}\\sigma^2_B`: Flax's rule, for models whose statistics must evolve as
  they did under Flax.
  """
  count = batch.count
  batch_var = batch.var * (count / jnp.maximum(count - 1, 1) if unbiased else 1)
  mean = batch.mean
  finite = jnp.isfinite(mean) & jnp.isfinite(batch_var)
  var_count = count if var_count is None else var_count
  mean_dtype = running.mean.dtype
  if jnp.iscomplexobj(mean):  # complex input: the running mean becomes complex, as in Flax
    mean_dtype = jnp.promote_types(mean_dtype, jnp.complex64)
  new_mean = momentum * running.mean + (1 - momentum) * mean.astype(mean_dtype)
  new_var = momentum * running.var + (1 - momentum) * batch_var.astype(running.var.dtype)
  return BatchStats(jnp.where(finite & (count > 1), new_mean, running.mean),
                    jnp.where(finite & (var_count > 1), new_var, running.var))


def values_per_channel(shape: tuple[int, ...], reduction_axes: tuple[int, ...]) -> int:
  """How many values of one channel a batch of ``shape`` holds on this device."""
  size = 1
  for axis in reduction_axes:
    size *= shape[axis]
  return size


def batch_axes(x: Array, feature_axes: tuple[int, ...], axis_name: AxisName | None
               ) -> tuple[int, ...]:
  """The axes batch statistics reduce (all but ``feature_axes``), after checking the size."""
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  if axis_name is None and values_per_channel(x.shape, reduction_axes) < 2:
    raise ValueError(
        f"batch norm in training needs at least 2 values per channel, but x.shape={x.shape} "
        f"has 1 over axes {reduction_axes}; use a larger batch, use_running_average=True "
        f"(evaluation), or a norm that does not depend on the batch (LayerNorm, GroupNorm)")
  return reduction_axes


def feature_shaped(moments: Moments, feature_axes: tuple[int, ...]) -> Moments:
  """The moments with the reduced (size 1) axes dropped: the shape of the running stats."""
  squeeze = tuple(a for a in range(moments.var.ndim) if a not in feature_axes)
  return Moments(*(jnp.squeeze(m, squeeze) for m in moments))


def checked_input(x: ArrayLike, running, axis: Axes, name: str, *, complex_ok: bool = False
                  ) -> tuple[Array, tuple[int, ...]]:
  """``x`` as a float array and its canonical feature axes, after checking the running stats."""
  x = checks.float_input(x, name, complex_ok=complex_ok)
  feature_axes = checks.canonical_axes(axis, x.ndim, name="axis", shape=x.shape)
  if running is not None:
    checks.running_stats_shape(running, tuple(x.shape[a] for a in feature_axes), name)
  return x, feature_axes


class TrainingStatistic(NamedTuple):
  """What a member of the batch-norm family normalizes a training batch with.

  Attributes:
    moments: the moments that normalize ``x`` (reshaped to ``view`` when given).
    update: feature-shaped moments the running statistics move towards.
    gain, offset: optional per-channel correction of the standardized batch (renorm's r, d).
    view: the shape ``x`` is normalized in (ghost batch norm's virtual batches), or None.
    var_count: the count that gates the running variance's update (default: ``update.count``).
  """
  moments: Moments
  update: Moments
  gain: Array | None = None
  offset: Array | None = None
  view: tuple[int, ...] | None = None
  var_count: Array | None = None


# (x, feature_axes, mask, axis_name, axis_index_groups) -> TrainingStatistic
Statistic = Callable[[Array, tuple[int, ...], Array | None, AxisName | None, Groups],
                     TrainingStatistic]


def batch_norm_family(name: str, statistic: Statistic, x: ArrayLike, running,
                      scale: ArrayLike | None, bias: ArrayLike | None, *, training: bool,
                      axis: Axes, momentum: float, epsilon: float, where: ArrayLike | None,
                      axis_name: AxisName | None, axis_index_groups: Groups, dtype: Any,
                      complex_ok: bool = False, unbiased_running_var: bool = True):
  """The skeleton every batch norm shares: returns ``(y, next_running)``.

  In evaluation, ``x`` is normalized with the running statistics, returned unchanged. In
  training, ``statistic`` gives the moments (and correction) to normalize with, and the
  running statistics (any NamedTuple with ``mean`` and ``var``, or None) move towards its
  ``update`` (:func:`update_batch_stats`). ``complex_ok``: accept complex ``x`` (plain batch
  norm, whose statistics have a complex meaning). ``unbiased_running_var=False``: the running
  variance averages the biased batch variance (Flax's rule).
  """
  x, feature_axes = checked_input(x, running, axis, name, complex_ok=complex_ok)
  if not training:
    if running is None:
      raise ValueError(f"{name} with training=False needs the running statistics; pass "
                       f"running=BatchStats(mean, var) (jaxnorm.init_batch_stats to start)")
    given = normalize.given_moments(running.mean, running.var, x, feature_axes)
    return normalize.normalize_with(x, given, scale, bias, feature_axes=feature_axes,
                                    epsilon=epsilon, dtype=dtype), running
  where = checks.broadcast_mask(where, x.shape)
  part = statistic(x, feature_axes, where, axis_name, axis_index_groups)
  x_view, view_features = x, feature_axes
  if part.view is not None:  # a leading axis split in two: every feature axis moves by one
    x_view, view_features = x.reshape(part.view), tuple(a + 1 for a in feature_axes)
  y = normalize.normalize_with(x_view, part.moments, scale, bias, feature_axes=view_features,
                               epsilon=epsilon, dtype=dtype, gain=part.gain,
                               offset=part.offset).reshape(x.shape)
  if running is None:
    return y, None
  new = update_batch_stats(BatchStats(running.mean, running.var), part.update, momentum,
                           var_count=part.var_count, unbiased=unbiased_running_var)
  return y, running._replace(mean=new.mean, var=new.var)


def batch_statistic(x: Array, feature_axes: tuple[int, ...], where: Array | None,
                    axis_name: AxisName | None, axis_index_groups: Groups) -> TrainingStatistic:
  """Batch norm's: the moments of the batch over every axis but ``feature_axes``."""
  moments = moments_lib.pooled_moments(x, batch_axes(x, feature_axes, axis_name), where,
                                       axis_name, axis_index_groups)
  return TrainingStatistic(moments, feature_shaped(moments, feature_axes))


def batch_norm(x: ArrayLike, running: BatchStats | None, scale: ArrayLike | None = None,
               bias: ArrayLike | None = None, *, training: bool, axis: Axes = -1,
               momentum: float = 0.99, epsilon: float = 1e-5, where: ArrayLike | None = None,
               axis_name: AxisName | None = None, axis_index_groups=None,
               dtype: Any = None, unbiased_running_var: bool = True
               ) -> tuple[Array, BatchStats | None]:
  """Batch normalization with explicit state: returns the output and the next running stats.

  .. math:: y = \\frac{x - \\mu_B}{\\sqrt{\\sigma^2_B + \\epsilon}} \\cdot \\gamma + \\beta

  In training, :math:`\\mu_B, \\sigma^2_B` are the (biased) statistics of the valid elements of
  the batch over every axis but ``axis`` (pooled by count over the devices of ``axis_name``), and
  the running statistics move towards them (:func:`update_batch_stats`). In evaluation, the
  running statistics are used and returned unchanged.

  Args:
    x: input, at least 2 values per channel in training; real or complex (then the mean and
      the running mean are complex, the variance :math:`E|x - \\mu|^2` real, as in Flax).
    running: the running statistics (:class:`BatchStats`, feature-shaped), or None in training
      to use batch statistics only (then None is returned for them).
    scale, bias: optional per-feature :math:`\\gamma` and :math:`\\beta`.
    training: batch statistics if True, running statistics if False.
    axis: the feature axis or axes.
    momentum: weight of the old running statistics in the moving average.
    epsilon: added to the variance.
    where: optional mask broadcastable to ``x``: only its True elements enter the statistics.
    axis_name, axis_index_groups: pool the statistics over these devices.
    dtype: output dtype (default: result type of x, scale and bias).
    unbiased_running_var: the running variance averages the unbiased batch variance
      :math:`\\frac{n}{n-1}\\sigma^2_B` (PyTorch's rule, the default), or with False the biased
      :math:`\\sigma^2_B` (Flax's, Haiku's and Keras's rule: what a model trained with them
      expects). Normalizing a batch uses the biased variance either way.

  Returns:
    ``(y, next_running)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, running = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(1), training=True,
    ...                                 momentum=0.9, epsilon=0.0)
    >>> y.ravel(), running.mean, running.var
    (Array([-1.,  1.], dtype=float32), Array([0.2], dtype=float32), Array([1.1], dtype=float32))
  """
  return batch_norm_family("batch_norm", batch_statistic, x, running, scale, bias,
                           training=training, axis=axis, momentum=momentum, epsilon=epsilon,
                           where=where, axis_name=axis_name,
                           axis_index_groups=axis_index_groups, dtype=dtype, complex_ok=True,
                           unbiased_running_var=unbiased_running_var)
