"""Variants of batch norm that change *which* statistics normalize: ghost batches and Lp scales.

Ghost (virtual) batch norm (Hoffer, Hubara and Soudry 2017, "Train longer, generalize better")
normalizes each sub-batch of ``virtual_batch_size`` examples with its own statistics, as
tf.keras' ``BatchNormalization(virtual_batch_size=...)`` did: a large batch keeps the noise, and
the regularization, of small ones.

The Lp variants (Santurkar, Tsipras, Ilyas and Madry 2018, "How does batch normalization help
optimization?", section 3.3) keep batch norm's centring but divide by another measure of
spread: the mean absolute deviation (p = 1), the standard deviation (p = 2, batch norm) or the
maximum absolute deviation (p = inf). They found all three train about as well as batch norm,
evidence that the benefit is a smoother loss landscape rather than controlled moments.

Both are pure functions with explicit running statistics (:class:`jaxnorm.BatchStats`), like
:func:`jaxnorm.batch_norm`, and evaluate with the running statistics like it.
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import collectives
from jaxnorm._src.batch_norm import BatchStats
from jaxnorm._src.moments import AxisName, Axes, Groups, Moments

L1_GAUSSIAN_SCALE = math.sqrt(math.pi / 2)
"""E|x - mu| = sigma * sqrt(2 / pi) for a Gaussian: the L1 spread times this estimates sigma."""


def ghost_moments(x: Array, feature_axes: tuple[int, ...], virtual_batch_size: int,
                  where: Array | None, axis_name: AxisName | None,
                  axis_index_groups: Groups) -> tuple[tuple[int, ...], Moments]:
  """The shape ``(G, V, ...)`` of x split into virtual batches, and each one's moments.

  The moments keep the group axis (size G) and the reduced axes as size 1.
  """
  batch = x.shape[0]
  if 0 in feature_axes:
    raise ValueError(f"ghost batch norm splits axis 0, the batch of x.shape={x.shape}, but "
                     f"axis={feature_axes} makes it a feature axis; put the batch first")
  if virtual_batch_size <= 0 or batch % virtual_batch_size:
    divisors = [v for v in range(2, batch + 1) if batch % v == 0]
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} must divide the batch of {batch} examples "
        f"of x.shape={x.shape}; pick one of {divisors}, or pad the batch to a multiple of "
        f"{virtual_batch_size} and mask the padding out with mask= (where= in the functions)")
  view = (batch // virtual_batch_size, virtual_batch_size) + x.shape[1:]
  if where is not None:
    where = jnp.broadcast_to(where, x.shape).reshape(view)
  shifted_features = tuple(a + 1 for a in feature_axes)
  reduction_axes = tuple(a for a in range(1, len(view)) if a not in shifted_features)
  if axis_name is None and bn.values_per_channel(view, reduction_axes) < 2:
    raise ValueError(
        f"ghost batch norm in training needs at least 2 values per channel in each virtual "
        f"batch, but virtual_batch_size={virtual_batch_size} with x.shape={x.shape} gives 1; "
        f"use virtual_batch_size >= 2 or use_running_average=True (evaluation)")
  return view, moments_lib.pooled_moments(x.reshape(view), reduction_axes, where, axis_name,
                                          axis_index_groups)


def pooled_within(moments: Moments) -> tuple[Moments, Array]:
  """The moments the running statistics move towards, from the virtual batches' (axis 0).

  Count, shift and mean are those of all valid elements (:func:`collectives.merge_moments`); the
  variance is the pooled within-batch estimate :math:`\\sum_g n_g \\sigma_g^2 / \\sum_g (n_g - 1)`,
  stored times :math:`(n - 1) / n` so that :func:`jaxnorm.update_batch_stats`' ``n / (n - 1)``
  turns it back into exactly that estimate. Also returns the degrees of freedom
  :math:`\\sum_g (n_g - 1)`: without any, the variance has no estimate.
  """
  merged = collectives.merge_moments(moments)
  counts = moments.count
  dof = jnp.sum(jnp.maximum(counts - 1, 0), axis=0)
  squares = jnp.sum(counts * moments.var, axis=0)
  count = merged.count
  var = jnp.where(dof > 0, squares * (count - 1), 0) / jnp.where(dof > 0, dof * count, 1)
  return merged._replace(var=var), dof


def ghost_batch_norm(x: ArrayLike, running: BatchStats | None, scale: ArrayLike | None = None,
                     bias: ArrayLike | None = None, *, training: bool,
                     virtual_batch_size: int | None, axis: Axes = -1, momentum: float = 0.99,
                     epsilon: float = 1e-5, where: ArrayLike | None = None,
                     axis_name: AxisName | None = None, axis_index_groups=None,
                     dtype: Any = None) -> tuple[Array, BatchStats | None]:
  """Ghost (virtual) batch norm: each sub-batch of the batch normalized with its own statistics.

  .. math::

     y_i = \\frac{x_i - \\mu_{g(i)}}{\\sqrt{\\sigma^2_{g(i)} + \\epsilon}}\\,\\gamma + \\beta,
     \\qquad g(i) = \\lfloor i / V \\rfloor

  The batch (axis 0) is split into consecutive virtual batches of ``V = virtual_batch_size``
  examples; the mean and variance of each come from its valid elements over every axis but
  ``axis`` (Hoffer, Hubara and Soudry 2017; tf.keras' ``virtual_batch_size``). The running
  statistics move towards the average over the virtual batches: the mean of all valid elements
  and the pooled within-batch variance :math:`\\sum_g n_g\\sigma^2_g / \\sum_g (n_g - 1)`, an
  unbiased estimate as in :func:`jaxnorm.batch_norm`; a non-finite batch leaves a channel as it
  was. The mean moves once the batch holds 2 valid values, the variance once some virtual batch
  does. Evaluation uses the running statistics, at any batch size.

  With ``axis_name``, virtual batch g is the union of the g-th sub-batch of every device
  (pooled by count in one collective), so every device sees the same statistics and keeps the
  same running statistics. For per-device virtual batches, leave ``axis_name`` unset.

  Args:
    x: input with the batch on axis 0.
    running: running statistics (:class:`jaxnorm.BatchStats`), or None in training.
    scale, bias: optional per-feature :math:`\\gamma` and :math:`\\beta`.
    training: virtual-batch statistics if True, running statistics if False.
    virtual_batch_size: examples per virtual batch, a divisor of ``x.shape[0]`` in training
      (pad and mask with ``where`` otherwise); None: the whole batch (:func:`batch_norm`).
    axis: the feature axis or axes (not 0).
    momentum, epsilon, where, axis_name, axis_index_groups, dtype: as :func:`batch_norm`.

  Returns:
    ``(y, next_running)``.

  Raises:
    ValueError: ``virtual_batch_size`` does not divide the batch.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1.0], [3.0], [10.0], [30.0]])
    >>> y, running = jaxnorm.ghost_batch_norm(x, jaxnorm.init_batch_stats(1), training=True,
    ...                                       virtual_batch_size=2, epsilon=0.0, momentum=0.0)
    >>> y.ravel()
    Array([-1.,  1., -1.,  1.], dtype=float32)
    >>> running.mean, running.var                # var: (2 * 1 + 2 * 100) / (1 + 1)
    (Array([11.], dtype=float32), Array([101.], dtype=float32))
  """
  if virtual_batch_size is None:
    return bn.batch_norm(x, running, scale, bias, training=training, axis=axis,
                         momentum=momentum, epsilon=epsilon, where=where, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, dtype=dtype)

  def virtual_batches(x, feature_axes, where, axis_name, axis_index_groups):
    view, moments = ghost_moments(x, feature_axes, virtual_batch_size, where, axis_name,
                                  axis_index_groups)
    pooled, dof = pooled_within(moments)
    pooled = bn.feature_shaped(pooled, feature_axes)
    # the mean needs 2 valid values in all, the variance a degree of freedom within a batch
    var_count = jnp.where(jnp.reshape(dof, pooled.count.shape) > 0, pooled.count, 0)
    return bn.TrainingStatistic(moments, pooled, view=view, var_count=var_count)

  return bn.batch_norm_family("ghost_batch_norm", virtual_batches, x, running, scale, bias,
                              training=training, axis=axis, momentum=momentum,
                              epsilon=epsilon, where=where, axis_name=axis_name,
                              axis_index_groups=axis_index_groups, dtype=dtype)


def canonical_p(p: float | str) -> float:
  """``p`` as 1.0, 2.0 or inf, or a ValueError naming the choices."""
  if isinstance(p, str) and p.lower() in ("inf", "infinity"):
    return math.inf
  if not isinstance(p, str) and p in (1, 2, math.inf):
    return float(p)
  raise ValueError(f"p={p!r} is not supported; use p=1 (mean absolute deviation), p=2 "
                   f"(standard deviation, batch norm) or p=math.inf (max absolute deviation)")


def lp_spread(x: Array, moments: Moments, reduction_axes: tuple[int, ...], p: float, *,
              where: Array | None, axis_name: AxisName | None, axis_index_groups) -> Array:
  """The squared spread :math:`s_p^2` of the valid elements about the (pooled) batch mean.

  :math:`s_1 = \\sqrt{\\pi/2}\\,\\overline{|x - \\mu_B|}`, :math:`s_2 = \\sigma_B`,
  :math:`s_\\infty = \\max |x - \\mu_B|` (reduced axes kept as size 1).
  """
  if p == 2:
    return moments.var
  deviation = jnp.abs(moments.centred(x))
  if p == 1:
    mean_deviation = moments_lib.pooled_moments(deviation, reduction_axes, where, axis_name,
                                                axis_index_groups).mean
    return jnp.square(L1_GAUSSIAN_SCALE * mean_deviation)
  if where is not None:
    deviation = jnp.where(where, deviation, 0)
  largest = jnp.max(deviation, axis=reduction_axes, keepdims=True)
  if axis_name is not None:
    largest = lax.pmax(largest, axis_name, axis_index_groups=axis_index_groups)
  return jnp.square(largest)


def lp_batch_norm(x: ArrayLike, running: BatchStats | None, scale: ArrayLike | None = None,
                  bias: ArrayLike | None = None, *, training: bool, p: float | str = 2,
                  axis: Axes = -1, momentum: float = 0.99, epsilon: float = 1e-5,
                  where: ArrayLike | None = None, axis_name: AxisName | None = None,
                  axis_index_groups=None, dtype: Any = None) -> tuple[Array, BatchStats | None]:
  """Batch norm that divides by the L1, L2 or L-infinity spread of the batch (Santurkar 2018).

  .. math::

     y = \\frac{x - \\mu_B}{\\sqrt{s_p^2 + \\epsilon}}\\,\\gamma + \\beta, \\qquad
     s_1 = \\sqrt{\\tfrac{\\pi}{2}}\\; \\frac{1}{n}\\sum_i |x_i - \\mu_B|, \\quad
     s_2 = \\sqrt{\\frac{1}{n}\\sum_i (x_i - \\mu_B)^2}, \\quad
     s_\\infty = \\max_i |x_i - \\mu_B|

  over the valid elements of the batch on every axis but ``axis`` (pooled over the devices of
  ``axis_name``). ``p=2`` is :func:`jaxnorm.batch_norm` exactly. Santurkar, Tsipras, Ilyas and
  Madry (2018, "How does batch normalization help optimization?") trained with all three and
  found them on a par with batch norm.

  The L1 spread is multiplied by :math:`\\sqrt{\\pi/2}`, as in Hoffer, Banner, Golan and Soudry
  (2018, "Norm matters"), so that it equals the standard deviation for Gaussian activations:
  outputs, running statistics and learning rates then stay on batch norm's scale. A constant
  factor is absorbed by the learned scale: for Santurkar's plain mean absolute deviation,
  multiply :math:`\\gamma` by :math:`\\sqrt{2/\\pi}`. The L-infinity spread is not rescaled (it
  grows with the batch size, about :math:`\\sigma\\sqrt{2\\ln n}` for Gaussians).

  The running statistics store the mean and the running average of :math:`s_p^2 \\cdot n/(n-1)`
  in ``var`` (batch norm's unbiased variance for ``p=2``); evaluation divides by
  :math:`\\sqrt{\\mathrm{var} + \\epsilon}`. For ``p`` 1 and inf the spread needs the pooled
  mean first: two collectives per call instead of one.

  Args:
    p: 1, 2 or ``math.inf`` (or ``"inf"``).
    x, running, scale, bias, training, axis, momentum, epsilon: as :func:`jaxnorm.batch_norm`.
    where, axis_name, axis_index_groups, dtype: as :func:`jaxnorm.batch_norm`.

  Returns:
    ``(y, next_running)``.

  Example:
    >>> import math, jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[0.0], [2.0], [3.0], [7.0]])     # mean 3, max deviation 4
    >>> y, _ = jaxnorm.lp_batch_norm(x, None, training=True, p=math.inf, epsilon=0.0)
    >>> y.ravel()
    Array([-0.75, -0.25,  0.  ,  1.  ], dtype=float32)
  """
  p = canonical_p(p)
  if p == 2:
    return bn.batch_norm(x, running, scale, bias, training=training, axis=axis,
                         momentum=momentum, epsilon=epsilon, where=where, axis_name=axis_name,
                         axis_index_groups=axis_index_groups, dtype=dtype)

  def spread(x, feature_axes, where, axis_name, axis_index_groups):
    moments = bn.batch_statistic(x, feature_axes, where, axis_name, axis_index_groups).moments
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    moments = moments._replace(var=lp_spread(
        x.astype(moments.var.dtype), moments, reduction_axes, p, where=where,
        axis_name=axis_name, axis_index_groups=axis_index_groups))
    return bn.TrainingStatistic(moments, bn.feature_shaped(moments, feature_axes))

  return bn.batch_norm_family("lp_batch_norm", spread, x, running, scale, bias,
                              training=training, axis=axis, momentum=momentum,
                              epsilon=epsilon, where=where, axis_name=axis_name,
                              axis_index_groups=axis_index_groups, dtype=dtype)
