"""Flax NNX batch norms: drop-in for ``flax.nnx.BatchNorm``, and its variants.

``BatchRenorm``, ``GhostBatchNorm`` and ``LpBatchNorm`` take ``BatchNorm``'s arguments plus
their own and differ from it only in the pure function they call and its options.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import batch_norm_variants as variants
from jaxnorm._src import checks
from jaxnorm._src import renorm
from jaxnorm._src.nnx_common import (NO_METADATA, Axes, Features, FloatOrSchedule, Initializer,
                                     check_features, feature_shape_of, scale_and_bias, store,
                                     value)


class BatchNorm(nnx.Module):
  """Batch normalization (Ioffe and Szegedy 2015), drop-in for ``flax.nnx.BatchNorm``.

  .. math:: y = \\frac{x - \\mu_B}{\\sqrt{\\sigma^2_B + \\epsilon}} \\cdot \\gamma + \\beta

  In training, :math:`\\mu_B, \\sigma^2_B` are the statistics of the batch (over every axis but
  ``axis``, pooled by count over the devices or ``nnx.vmap`` lanes of ``axis_name``) and the
  running statistics ``mean`` and ``var`` move towards them; in evaluation the running
  statistics are used and left unchanged. :func:`jaxnorm.batch_norm` does the work.

  ``model.train()`` and ``model.eval()`` set ``use_running_average`` (False, True), as does
  ``nnx.view(model, use_running_average=...)``; the argument of ``__call__`` overrides it.

  Differences from Flax, all fixes: a stable variance at any offset; masked statistics pooled
  by count across devices; running statistics kept in float32 whatever ``dtype``; a batch with a
  non-finite statistic, or fewer than 2 valid values, leaves a channel's running statistics
  unchanged; the running variance averages the unbiased batch variance (as PyTorch), or with
  ``unbiased_running_var=False`` the biased one (Flax's rule, what ``jaxnorm.nnx.convert``
  sets so that a converted model's statistics evolve as under Flax).

  Args:
    num_features: the size of the feature axis (a tuple when ``axis`` names several).
    use_running_average: normalize with the running statistics (evaluation) if True.
    axis: the feature axis or axes.
    momentum: weight of the old running statistics in their moving average.
    epsilon: added to the variance.
    dtype: the output dtype (default: result type of the input and parameters).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: whether to learn ``bias`` (:math:`\\beta`) and ``scale``
      (:math:`\\gamma`).
    bias_init, scale_init: their initializers.
    axis_name, axis_index_groups: pool the batch statistics over these devices or lanes.
    use_fast_variance, promote_dtype: accepted for compatibility with Flax, not used.
    unbiased_running_var: the running variance averages the unbiased batch variance (True,
      PyTorch's rule) or the biased one (False, Flax's).
    rngs: keys for the initializers (optional when they are constant).
    bias_metadata, scale_metadata: metadata of the ``nnx.Param`` (e.g. sharding).

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.BatchNorm(2, momentum=0.9)
    >>> y = layer(jnp.arange(8.0).reshape(4, 2))
    >>> layer.mean[...]
    Array([0.3, 0.4], dtype=float32)
    >>> layer.eval()
    >>> layer.use_running_average
    True
  """

  def __init__(
      self,
      num_features: Features,
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
      unbiased_running_var: bool = True,
  ):
    feature_shape = feature_shape_of(num_features)
    running = bn.init_batch_stats(feature_shape, jnp.float32)
    self.mean = nnx.BatchStat(running.mean)
    self.var = nnx.BatchStat(running.var)
    self.scale, self.bias = scale_and_bias(
        feature_shape, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.unbiased_running_var = unbiased_running_var
    if not unbiased_running_var and type(self).function is not bn.batch_norm:
      raise ValueError(f"{type(self).__name__} keeps the unbiased running variance; "
                       f"unbiased_running_var=False (Flax's rule) is BatchNorm's option only")

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x``; in training, also updates ``mean`` and ``var``.

    Args:
      x: the input, at least 2 values per feature in training (unless ``axis_name`` pools).
      use_running_average: overrides the attribute of the same name for this call.
      mask: optional boolean array broadcastable to ``x``: only its True elements enter the
        batch statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x, feature_axes, training = self._prepare(x, use_running_average)
    y, running = self.function(
        x, self._running(), value(self.scale), value(self.bias), training=training,
        axis=feature_axes, momentum=self.momentum, epsilon=self.epsilon, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        dtype=self._output_dtype(x), **self._options())
    if training:
      self._store(running)
    return y

  # What a variant changes: the pure function, its running state and its own options.
  function = staticmethod(bn.batch_norm)

  def _running(self) -> Any:
    return bn.BatchStats(self.mean[...], self.var[...])

  def _options(self) -> dict[str, Any]:
    return {"unbiased_running_var": self.unbiased_running_var}

  def _prepare(self, x, use_running_average: bool | None) -> tuple[jax.Array, tuple[int, ...],
                                                                   bool]:
    """The checked input, its feature axes, and whether this call trains."""
    layer = type(self).__name__
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          f"{layer} needs use_running_average: pass it to the constructor "
          f"({layer}(..., use_running_average=False)), to the call (layer(x, "
          f"use_running_average=True)), or set it with model.train() / model.eval()")
    x = checks.float_input(x, layer, complex_ok=layer == "BatchNorm")
    feature_axes = check_features(x, self.axis, self.mean[...].shape, layer=layer, name="axis")
    return x, feature_axes, not use_running_average

  def _output_dtype(self, x: jax.Array) -> Any:
    """``dtype``, or as ``flax.nnx``: the result type of x, the running statistics (float32),
    scale and bias, which flax promotes together (so bfloat16 x and params give float32)."""
    if self.dtype is not None:
      return self.dtype
    params = [p for p in (value(self.scale), value(self.bias)) if p is not None]
    return jnp.result_type(x, self.mean[...], self.var[...], *params)

  def _store(self, running: Any) -> None:
    """Writes the next running state, a NamedTuple whose fields name the BatchStats."""
    for name, new_value in running._asdict().items():
      store(getattr(self, name), new_value, type(self).__name__)

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
  """Batch Renormalization (Ioffe 2017): :class:`BatchNorm`'s arguments plus ``rmax``, ``dmax``.

  .. math::

     y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\, r + d\\Big) + \\beta, \\quad
     r = \\operatorname{sg}\\Big(\\operatorname{clip}_{[1/r_{max}, r_{max}]}
         \\frac{\\sigma_B}{\\sigma}\\Big), \\quad
     d = \\operatorname{sg}\\Big(\\operatorname{clip}_{[-d_{max}, d_{max}]}
         \\frac{\\mu_B - \\mu}{\\sigma}\\Big)

  In training the batch statistics normalize, corrected towards the running averages
  :math:`\\mu, \\sigma` by ``r`` and ``d``, which carry no gradient
  (:func:`jaxnorm.batch_renorm`); evaluation uses the running averages. ``rmax`` and ``dmax``
  are floats or schedules of the training step, counted in the ``nnx.BatchStat`` ``step``
  (int32); the paper's recipe is :func:`jaxnorm.renorm_schedule`. With ``rmax=1, dmax=0`` it
  equals :class:`BatchNorm`. The state is that of ``jaxnorm.linen.BatchRenorm``.

  Args:
    num_features: the size of the feature axis.
    rmax: clip of r (>= 1), a float or a callable step -> value (optax schedules work).
    dmax: clip of d (>= 0), a float or a callable step -> value.
    **kwargs: :class:`BatchNorm`'s other arguments.

  Example:
    >>> import jax.numpy as jnp, jaxnorm, jaxnorm.nnx as jnnx
    >>> schedule = jaxnorm.renorm_schedule(warmup_steps=1000, relax_steps=4000)
    >>> layer = jnnx.BatchRenorm(2, rmax=schedule.rmax, dmax=schedule.dmax)
    >>> y = layer(jnp.arange(8.0).reshape(4, 2))
    >>> layer.step[...], layer.mean[...]
    (Array(1, dtype=int32), Array([0.03, 0.04], dtype=float32))
  """

  def __init__(self, num_features: Features, *, rmax: FloatOrSchedule = 3.0,
               dmax: FloatOrSchedule = 5.0, **kwargs):
    super().__init__(num_features, **kwargs)
    self.step = nnx.BatchStat(renorm.init_renorm_stats(1).step)
    self.rmax = rmax
    self.dmax = dmax

  function = staticmethod(renorm.batch_renorm)

  def _running(self) -> Any:
    return renorm.RenormStats(self.mean[...], self.var[...], self.step[...])

  def _options(self) -> dict[str, Any]:
    return {"rmax": self.rmax, "dmax": self.dmax}


class GhostBatchNorm(BatchNorm):
  """Ghost (virtual) batch norm: :class:`BatchNorm` with statistics per sub-batch.

  .. math:: y_i = \\frac{x_i - \\mu_{g(i)}}{\\sqrt{\\sigma^2_{g(i)} + \\epsilon}}\\,
     \\gamma + \\beta, \\qquad g(i) = \\lfloor i / V \\rfloor

  In training the batch (axis 0) is split into virtual batches of ``virtual_batch_size``
  examples, each normalized with its own statistics (Hoffer, Hubara and Soudry 2017); the
  running statistics average over them (:func:`jaxnorm.ghost_batch_norm`). With
  ``virtual_batch_size=None`` it is :class:`BatchNorm`. The state is :class:`BatchNorm`'s.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.GhostBatchNorm(1, virtual_batch_size=2)
    >>> layer(jnp.array([[1.0], [3.0], [10.0], [30.0]])).ravel().round(3)
    Array([-1.,  1., -1.,  1.], dtype=float32)
  """

  def __init__(self, num_features: Features, *, virtual_batch_size: int | None = None,
               **kwargs):
    super().__init__(num_features, **kwargs)
    self.virtual_batch_size = virtual_batch_size

  function = staticmethod(variants.ghost_batch_norm)

  def _options(self) -> dict[str, Any]:
    return {"virtual_batch_size": self.virtual_batch_size}


class LpBatchNorm(BatchNorm):
  """Batch norm divided by the L1, L2 or L-infinity spread of the batch (Santurkar et al. 2018).

  .. math:: y = \\frac{x - \\mu_B}{\\sqrt{s_p^2 + \\epsilon}}\\,\\gamma + \\beta

  :class:`BatchNorm`'s arguments plus ``p``: 1 (mean absolute deviation times
  :math:`\\sqrt{\\pi/2}`), 2 (the standard deviation: :class:`BatchNorm` exactly) or
  ``math.inf`` (maximum absolute deviation). See :func:`jaxnorm.lp_batch_norm`.

  Example:
    >>> import math, jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.LpBatchNorm(1, p=math.inf, epsilon=0.0)
    >>> layer(jnp.array([[0.0], [2.0], [3.0], [7.0]])).ravel()
    Array([-0.75, -0.25,  0.  ,  1.  ], dtype=float32)
  """

  def __init__(self, num_features: Features, *, p: float | str = 2, **kwargs):
    super().__init__(num_features, **kwargs)
    self.p = variants.canonical_p(p)

  function = staticmethod(variants.lp_batch_norm)

  def _options(self) -> dict[str, Any]:
    return {"p": self.p}
