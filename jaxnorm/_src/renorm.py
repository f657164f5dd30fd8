"""Batch Renormalization (Ioffe 2017) as a pure function, with explicit running state and schedules.

Batch norm normalizes a training batch with its own statistics and evaluates with moving
averages: with small or non-i.i.d. batches the two disagree, and the model learns on activations
it never sees at evaluation. Batch renormalization keeps the batch statistics in the forward and
backward pass but corrects the output towards the moving averages with two per-channel factors
that carry no gradient:

.. math::

   \\hat x = \\frac{x - \\mu_B}{\\sigma_B}\\, r + d, \\qquad
   r = \\operatorname{sg}\\Big(\\operatorname{clip}_{[1/r_{max},\\, r_{max}]}
       \\frac{\\sigma_B}{\\sigma}\\Big), \\qquad
   d = \\operatorname{sg}\\Big(\\operatorname{clip}_{[-d_{max},\\, d_{max}]}
       \\frac{\\mu_B - \\mu}{\\sigma}\\Big)

with :math:`\\mu, \\sigma` the moving averages *before* this step's update. Unclipped, the
output equals :math:`(x - \\mu)/\\sigma`, the evaluation-time output. With
:math:`r_{max} = 1, d_{max} = 0` it is batch norm. The paper starts as batch norm and relaxes
the clips: :func:`renorm_schedule` builds that recipe, and any callable ``step -> value`` (an
optax schedule, for example) may set ``rmax`` and ``dmax``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src.moments import AxisName, Axes

Schedule = Callable[[Array], ArrayLike]
FloatOrSchedule = float | Schedule


class RenormStats(NamedTuple):
  """Running state of batch renorm: Flax's ``batch_stats/mean``, ``/var`` and ``/step``.

  ``mean`` and ``var`` are exactly :class:`jaxnorm.BatchStats`' (the variance averages the
  unbiased batch variance); ``step`` counts the training steps taken (int32), the argument of
  the ``rmax`` and ``dmax`` schedules.
  """
  mean: Array
  var: Array
  step: Array


def init_renorm_stats(feature_shape: int | tuple[int, ...], dtype: Any = jnp.float32
                      ) -> RenormStats:
  """Running state before any training: mean 0, variance 1, step 0.

  Example:
    >>> import jaxnorm
    >>> state = jaxnorm.init_renorm_stats(2)
    >>> state.mean, state.var, state.step
    (Array([0., 0.], dtype=float32), Array([1., 1.], dtype=float32), Array(0, dtype=int32))
  """
  running = bn.init_batch_stats(feature_shape, dtype)
  return RenormStats(running.mean, running.var, jnp.zeros((), jnp.int32))


class RenormSchedule(NamedTuple):
  """A pair of schedules, ``rmax(step)`` and ``dmax(step)``, each a callable step -> value."""
  rmax: Schedule
  dmax: Schedule


def _ramp(start: float, end: float, warmup_steps: int, relax_steps: int) -> Schedule:
  """``start`` until ``warmup_steps``, then linear to ``end`` over ``relax_steps``, then ``end``."""
  def schedule(step: ArrayLike) -> Array:
    step = jnp.asarray(step, jnp.float32)
    if relax_steps > 0:
      fraction = jnp.clip((step - warmup_steps) / relax_steps, 0.0, 1.0)
    else:
      fraction = (step >= warmup_steps).astype(jnp.float32)
    return jnp.float32(start) + jnp.float32(end - start) * fraction
  return schedule


def renorm_schedule(warmup_steps: int, relax_steps: int, *, rmax: float = 3.0,
                    dmax: float = 5.0, dmax_relax_steps: int | None = None) -> RenormSchedule:
  """The paper's recipe: batch norm for a warm-up, then the clips relaxed linearly.

  .. math::

     r_{max}(t) = 1 + (r_{max} - 1)\\,\\operatorname{clip}_{[0, 1]}
     \\frac{t - t_{warmup}}{t_{relax}}, \\qquad
     d_{max}(t) = d_{max}\\,\\operatorname{clip}_{[0, 1]}\\frac{t - t_{warmup}}{t'_{relax}}

  Ioffe (2017) used batch norm (:math:`r_{max} = 1, d_{max} = 0`) for the first 5000 steps, then
  reached :math:`r_{max} = 3` at 40k steps and :math:`d_{max} = 5` at 25k:
  ``renorm_schedule(5000, 35000, dmax_relax_steps=20000)``. The moving averages need those
  first steps to become good estimates before they correct anything.

  Args:
    warmup_steps: steps of plain batch norm (``rmax = 1``, ``dmax = 0``).
    relax_steps: steps over which ``rmax`` then grows linearly to its final value (0: at once).
    rmax, dmax: the final clips.
    dmax_relax_steps: steps over which ``dmax`` grows (default: ``relax_steps``).

  Returns:
    a :class:`RenormSchedule` ``(rmax, dmax)`` of callables of the step, usable under ``jit``.

  Example:
    >>> import jaxnorm
    >>> schedule = jaxnorm.renorm_schedule(warmup_steps=100, relax_steps=200)
    >>> [float(schedule.rmax(t)) for t in (0, 100, 200, 300, 1000)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
    >>> [float(schedule.dmax(t)) for t in (0, 200, 300)]
    [0.0, 2.5, 5.0]
  """
  if warmup_steps < 0 or relax_steps < 0 or (dmax_relax_steps or 0) < 0:
    raise ValueError(
        f"renorm_schedule needs non-negative step counts, got warmup_steps={warmup_steps}, "
        f"relax_steps={relax_steps}, dmax_relax_steps={dmax_relax_steps}")
  if rmax < 1 or dmax < 0:
    raise ValueError(f"renorm_schedule needs rmax >= 1 and dmax >= 0, got rmax={rmax}, "
                     f"dmax={dmax}; rmax=1, dmax=0 is plain batch norm")
  if dmax_relax_steps is None:
    dmax_relax_steps = relax_steps
  return RenormSchedule(_ramp(1.0, rmax, warmup_steps, relax_steps),
                        _ramp(0.0, dmax, warmup_steps, dmax_relax_steps))


def clip_value(value: FloatOrSchedule, step: Array, *, name: str, least: float) -> Array:
  """A clip as a float32 scalar: ``value(step)`` for a schedule, ``value`` itself otherwise."""
  if callable(value):
    value = value(step)
  elif (isinstance(value, (int, float, np.integer, np.floating, np.ndarray))
        and np.any(np.asarray(value) < least)):
    raise ValueError(f"{name}={value} must be at least {least}; rmax=1, dmax=0 is batch norm, "
                     f"the paper relaxes them to rmax=3, dmax=5")
  return jnp.asarray(value, jnp.float32)


def renorm_correction(batch_mean: Array, batch_var: Array, running_mean: Array,
                      running_var: Array, *, rmax: ArrayLike, dmax: ArrayLike,
                      epsilon: float) -> tuple[Array, Array]:
  """The factors ``r`` and ``d`` of batch renorm, without gradient.

  .. math::

     r = \\operatorname{clip}_{[1/r_{max}, r_{max}]}
         \\sqrt{\\frac{\\sigma_B^2 + \\epsilon}{\\sigma^2 + \\epsilon}}, \\qquad
     d = \\operatorname{clip}_{[-d_{max}, d_{max}]}
         \\frac{\\mu_B - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}
  """
  dtype = batch_var.dtype
  inv_sigma = lax.rsqrt(running_var.astype(dtype) + epsilon)
  rmax = jnp.asarray(rmax, dtype)
  dmax = jnp.asarray(dmax, dtype)
  r = jnp.clip(jnp.sqrt(batch_var + epsilon) * inv_sigma, 1 / rmax, rmax)
  d = jnp.clip((batch_mean - running_mean.astype(dtype)) * inv_sigma, -dmax, dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def batch_renorm(x: ArrayLike, running: RenormStats, scale: ArrayLike | None = None,
                 bias: ArrayLike | None = None, *, training: bool,
                 rmax: FloatOrSchedule = 3.0, dmax: FloatOrSchedule = 5.0, axis: Axes = -1,
                 momentum: float = 0.99, epsilon: float = 1e-5,
                 where: ArrayLike | None = None, axis_name: AxisName | None = None,
                 axis_index_groups=None, dtype: Any = None) -> tuple[Array, RenormStats]:
  """Batch renormalization (Ioffe 2017) with explicit state: the output and the next state.

  .. math::

     y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\, r + d\\Big) + \\beta, \\quad
     r = \\operatorname{sg}\\Big(\\operatorname{clip}_{[1/r_{max}, r_{max}]}
         \\frac{\\sigma_B}{\\sigma}\\Big), \\quad
     d = \\operatorname{sg}\\Big(\\operatorname{clip}_{[-d_{max}, d_{max}]}
         \\frac{\\mu_B - \\mu}{\\sigma}\\Big)

  In training, :math:`\\mu_B` and :math:`\\sigma_B = \\sqrt{\\sigma^2_B + \\epsilon}` come from
  the valid elements of the batch over every axis but ``axis`` (pooled by count over the devices
  of ``axis_name``, so r and d agree on every device); :math:`\\mu` and
  :math:`\\sigma = \\sqrt{\\hat\\sigma^2 + \\epsilon}` are the running statistics before this
  step's update; ``sg`` stops the gradient. The running statistics then move towards the batch
  ones exactly as in :func:`jaxnorm.batch_norm` (a non-finite batch leaves a channel unchanged)
  and ``step`` grows by one. In evaluation the running statistics normalize, as in batch norm.
  With ``rmax=1`` and ``dmax=0`` this is :func:`jaxnorm.batch_norm`.

  The running variance averages the unbiased batch variance (as :func:`jaxnorm.batch_norm`);
  the paper averages :math:`\\sigma_B` itself, which differs by a few percent at small batches.

  Args:
    x: input, at least 2 values per channel in training.
    running: the running state (:class:`RenormStats`, :func:`init_renorm_stats` to start).
    scale, bias: optional per-feature :math:`\\gamma` and :math:`\\beta`.
    training: batch statistics corrected by r and d if True, running statistics if False.
    rmax, dmax: the clips, each a float or a callable of the step (``running.step``, int32)
      such as :func:`renorm_schedule`'s or an optax schedule. ``rmax >= 1``, ``dmax >= 0``.
    axis: the feature axis or axes.
    momentum: weight of the old running statistics in the moving average.
    epsilon: added to the variances.
    where: optional mask broadcastable to ``x``: only its True elements enter the statistics.
    axis_name, axis_index_groups: pool the statistics over these devices.
    dtype: output dtype (default: result type of x, scale and bias).

  Returns:
    ``(y, next_running)``; in evaluation ``running`` itself.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> x = jnp.array([[1.0], [3.0]])          # batch mean 2, std 1
    >>> running = jaxnorm.RenormStats(jnp.array([0.0]), jnp.array([4.0]), jnp.array(0))
    >>> y, new = jaxnorm.batch_renorm(x, running, training=True, rmax=3.0, dmax=0.5,
    ...                               epsilon=0.0)
    >>> y.ravel(), new.step                     # r = 1/2, d = clip(1, -0.5, 0.5)
    (Array([0., 1.], dtype=float32), Array(1, dtype=int32))
  """
  if running is None:
    raise ValueError("batch_renorm needs the running state, in training too (r and d compare "
                     "the batch with it); pass jaxnorm.init_renorm_stats(num_features) to start")
  if training and not hasattr(running, "step"):
    raise ValueError(
        f"batch_renorm in training needs a RenormStats (mean, var and the step its schedules "
        f"read), got {type(running).__name__}; start from "
        f"jaxnorm.init_renorm_stats(num_features), or from BatchStats with "
        f"jaxnorm.RenormStats(stats.mean, stats.var, jnp.array(0, jnp.int32))")
  def corrected(x, feature_axes, where, axis_name, axis_index_groups):
    step = jnp.asarray(running.step, jnp.int32)
    moments = bn.batch_statistic(x, feature_axes, where, axis_name, axis_index_groups).moments
    running_mean = checks.feature_param(running.mean, x.shape, feature_axes, "running.mean")
    running_var = checks.feature_param(running.var, x.shape, feature_axes, "running.var")
    # mu_B - mu in the frame of the shift (an element of x): exact differences far from zero
    r, d = renorm_correction(moments.residual, moments.var, running_mean - moments.shift,
                             running_var, rmax=clip_value(rmax, step, name="rmax", least=1.0),
                             dmax=clip_value(dmax, step, name="dmax", least=0.0),
                             epsilon=epsilon)
    return bn.TrainingStatistic(moments, bn.feature_shaped(moments, feature_axes), r, d)

  y, new = bn.batch_norm_family("batch_renorm", corrected, x, running, scale, bias,
                                training=training, axis=axis, momentum=momentum,
                                epsilon=epsilon, where=where, axis_name=axis_name,
                                axis_index_groups=axis_index_groups, dtype=dtype)
  if training:
    new = new._replace(step=jnp.asarray(running.step, jnp.int32) + 1)
  return y, new
