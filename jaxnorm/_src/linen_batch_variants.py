"""Flax Linen layers for batch renorm, ghost batch norm and the Lp batch norms.

Each takes every argument of :class:`jaxnorm.linen.BatchNorm` (and so of
``flax.linen.BatchNorm``) with the same meaning, declares the same variables
(``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``), adds its own
options, and calls one pure function. They are separate layers rather than options of
``BatchNorm`` so that ``BatchNorm`` stays a drop-in for Flax's, and each layer's extra state and
batch-size rules (a step counter; a batch divisible into virtual batches) are visible in its
name. A checkpoint of a ``BatchNorm`` model loads into any of them; ``BatchRenorm`` adds
``batch_stats/step``, which such a checkpoint gets (at 0) the first time it trains.

Each layer is :class:`jaxnorm.linen.BatchNorm` with another pure function (``function``), its
own options (``_options``) and, for renorm, one more state variable.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import batch_norm_variants as variants
from jaxnorm._src import linen_norms
from jaxnorm._src import renorm

FloatOrSchedule = float | Callable[[Any], Any]


def _virtual_batches_fit(x, feature_axes: tuple[int, ...], size: int | None) -> bool:
  """Whether ``size`` divides the batch into virtual batches of 2 or more values per channel."""
  if size is None:
    return True
  if size <= 0 or 0 in feature_axes or x.shape[0] % size:
    return False
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  return bn.values_per_channel(x.shape, reduction_axes) // (x.shape[0] // size) >= 2


class BatchRenorm(linen_norms.BatchNorm):
  """Batch Renormalization (Ioffe 2017): :class:`BatchNorm`'s arguments plus ``rmax``, ``dmax``.

  In training the batch statistics normalize, corrected towards the running averages by
  ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``,
  which carry no gradient (:func:`jaxnorm.batch_renorm`); evaluation uses the running averages.
  ``rmax`` and ``dmax`` are floats or schedules of the training step, which is counted in
  ``batch_stats/step`` (int32, advanced by each training call, not by ``init``). The paper's
  recipe, batch norm for a warm-up then relaxed clips, is :func:`jaxnorm.renorm_schedule`.
  With ``rmax=1, dmax=0`` it equals :class:`BatchNorm`.

  Attributes:
    rmax: clip of r (>= 1), a float or a callable step -> value (optax schedules work).
    dmax: clip of d (>= 0), a float or a callable step -> value.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm, jaxnorm.linen as jnn
    >>> schedule = jaxnorm.renorm_schedule(warmup_steps=1000, relax_steps=4000)
    >>> layer = jnn.BatchRenorm(use_running_average=False, rmax=schedule.rmax,
    ...                         dmax=schedule.dmax)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["step"], updates["batch_stats"]["mean"]
    (Array(1, dtype=int32), Array([0.03, 0.04], dtype=float32))
  """
  rmax: FloatOrSchedule = 3.0
  dmax: FloatOrSchedule = 5.0

  function = staticmethod(renorm.batch_renorm)

  def _state_variables(self, mean, var):
    # A BatchNorm checkpoint has no step: it evaluates as it is, and gets one when it trains.
    if self.has_variable("batch_stats", "step") or self.is_mutable_collection("batch_stats"):
      return mean, var, self.variable("batch_stats", "step", jnp.zeros, (), jnp.int32)
    return mean, var

  def _running(self, state):
    step = state[2].value if len(state) > 2 else jnp.zeros((), jnp.int32)
    return renorm.RenormStats(state[0].value, state[1].value, step)

  def _options(self):
    return {"rmax": self.rmax, "dmax": self.dmax}


class GhostBatchNorm(linen_norms.BatchNorm):
  """Ghost (virtual) batch norm: :class:`BatchNorm` with statistics per sub-batch.

  In training the batch (axis 0) is split into virtual batches of ``virtual_batch_size``
  examples, each normalized with its own statistics (Hoffer, Hubara and Soudry 2017; tf.keras'
  ``virtual_batch_size``); the running statistics average over them
  (:func:`jaxnorm.ghost_batch_norm`). ``virtual_batch_size`` must divide the training batch
  (pad and pass ``mask`` otherwise); evaluation takes any batch. ``init`` with a batch that
  does not divide normalizes with the running statistics instead of raising. With
  ``virtual_batch_size=None`` it is :class:`BatchNorm`.

  Attributes:
    virtual_batch_size: examples per virtual batch, or None for the whole batch.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.GhostBatchNorm(use_running_average=False, virtual_batch_size=2)
    >>> x = jnp.array([[1.0], [3.0], [10.0], [30.0]])
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> y.ravel().round(3)
    Array([-1.,  1., -1.,  1.], dtype=float32)
  """
  virtual_batch_size: int | None = None

  function = staticmethod(variants.ghost_batch_norm)

  def _options(self):
    return {"virtual_batch_size": self.virtual_batch_size}

  def _batch_fits(self, x, feature_axes):
    return _virtual_batches_fit(x, feature_axes, self.virtual_batch_size)


class LpBatchNorm(linen_norms.BatchNorm):
  """Batch norm divided by the L1, L2 or L-infinity spread of the batch (Santurkar et al. 2018).

  :class:`BatchNorm`'s arguments plus ``p``: 1 divides by the mean absolute deviation times
  :math:`\\sqrt{\\pi/2}` (the standard deviation for Gaussians, Hoffer et al. 2018), 2 by the
  standard deviation (``BatchNorm`` exactly), ``math.inf`` by the maximum absolute deviation.
  See :func:`jaxnorm.lp_batch_norm`.

  Attributes:
    p: 1, 2 or ``math.inf``.

  Example:
    >>> import math, jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.LpBatchNorm(use_running_average=False, p=math.inf, epsilon=0.0)
    >>> x = jnp.array([[0.0], [2.0], [3.0], [7.0]])
    >>> y, _ = layer.init_with_output(jax.random.key(0), x)
    >>> y.ravel()
    Array([-0.75, -0.25,  0.  ,  1.  ], dtype=float32)
  """
  p: float | str = 2

  function = staticmethod(variants.lp_batch_norm)

  def _options(self):
    return {"p": variants.canonical_p(self.p)}
