"""Flax NNX layers: drop-in for ``flax.nnx``'s norms, thin over jaxnorm's pure functions.

Each layer takes ``flax.nnx``'s constructor arguments (``num_features``, ``rngs``, ...), holds
``nnx.Param`` ``scale`` and ``bias`` and, for batch norm, ``nnx.BatchStat`` ``mean`` and ``var``
under Flax's names, and calls one function of :mod:`jaxnorm`: a model can swap
``flax.nnx.BatchNorm`` for ``jaxnorm.nnx.BatchNorm`` and keep its checkpoint.

``use_fast_variance`` and ``promote_dtype`` are accepted so that Flax code runs unchanged;
jaxnorm always reduces in at least float32 with its stable variance and keeps running statistics
in float32 (``flax.nnx`` casts them, and the input, to ``dtype`` first: with ``dtype=bfloat16`` a
running mean of 300.3 becomes 300). ``rngs`` may be omitted when the initializers are constant.

The batch norm variants (``BatchRenorm``, ``GhostBatchNorm``, ``LpBatchNorm``) take
``BatchNorm``'s arguments plus their own, and the input layers (``Standardize``,
``MinMaxScale``, ``RobustScale``) hold fitted dataset statistics as :class:`InputStat`
variables; each is the NNX form of the ``jaxnorm.linen`` layer of the same name.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors
from flax import nnx
from flax.nnx.nn import initializers

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import batch_norm_variants as variants
from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src import linen_input
from jaxnorm._src import renorm
from jaxnorm._src import scalers

Initializer = Any
Axes = Any
Features = int | tuple[int, ...]
FloatOrSchedule = float | Callable[[Any], Any]
NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def feature_shape_of(num_features: Features) -> tuple[int, ...]:
  """``num_features`` as a shape: an int (as in Flax) or a tuple for several feature axes."""
  if isinstance(num_features, (int, np.integer)):
    return (int(num_features),)
  return tuple(int(n) for n in num_features)


CONSTANT_INITIALIZERS = (jax.nn.initializers.zeros, jax.nn.initializers.ones)


def draws_random_values(init: Initializer, shape: tuple[int, ...], dtype: Any) -> bool:
  """Whether ``init`` depends on its key: it gives other values for another key."""
  if any(init is constant_init for constant_init in CONSTANT_INITIALIZERS):
    return False
  with jax.ensure_compile_time_eval():
    first, second = (init(jax.random.key(seed), shape, dtype) for seed in (0, 1))
    try:
      return not bool(jnp.array_equal(first, second))
    except jax.errors.ConcretizationTypeError:
      return True


def param(init: Initializer, shape: tuple[int, ...], dtype: Any, rngs: nnx.Rngs | None,
          metadata: Mapping[str, Any], name: str = "scale") -> nnx.Param:
  """An ``nnx.Param`` from ``init``, with a key from ``rngs.params()`` as Flax draws it.

  Without ``rngs`` only a constant initializer is accepted: a fixed key would give every layer
  the same random values.
  """
  if rngs is not None:
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)
  if draws_random_values(init, shape, dtype):
    raise ValueError(
        f"{name}_init draws random values, but rngs=None; pass rngs=nnx.Rngs(0) (any seed), as "
        f"flax.nnx requires, or a constant initializer (nnx.initializers.ones_init(), "
        f"zeros_init() or constant(value))")
  return nnx.Param(init(jax.random.key(0), shape, dtype), **metadata)


def scale_and_bias(feature_shape: tuple[int, ...], *, use_scale: bool, use_bias: bool,
                   scale_init: Initializer, bias_init: Initializer, param_dtype: Any,
                   rngs: nnx.Rngs | None, scale_metadata: Mapping[str, Any],
                   bias_metadata: Mapping[str, Any]) -> tuple[Any, Any]:
  """``scale`` and ``bias`` params (or None), keys drawn in Flax's order: scale, then bias."""
  scale = (param(scale_init, feature_shape, param_dtype, rngs, scale_metadata) if use_scale
           else nnx.data(None))
  bias = (param(bias_init, feature_shape, param_dtype, rngs, bias_metadata, "bias") if use_bias
          else nnx.data(None))
  return scale, bias


def value(variable: nnx.Variable | None) -> jax.Array | None:
  """The array a variable holds, or None for a parameter the layer does not use."""
  return None if variable is None else variable[...]


def check_features(x: jax.Array, axes: Axes, feature_shape: tuple[int, ...], *, layer: str,
                   name: str) -> tuple[int, ...]:
  """The canonical feature axes of ``x``, checked against the layer's ``num_features``."""
  feature_axes = checks.canonical_axes(axes, x.ndim, name=name, shape=x.shape)
  found = tuple(x.shape[a] for a in feature_axes)
  if found != feature_shape:
    given = feature_shape[0] if len(feature_shape) == 1 else feature_shape
    wanted = found[0] if len(found) == 1 else found
    raise ValueError(
        f"{layer}(num_features={given}) got x.shape={x.shape}, whose {name}={axes} hold "
        f"{wanted} features; build the layer with num_features={wanted} or pass {name} "
        f"naming the feature axes")
  return feature_axes


def store(variable: nnx.Variable, new_value: jax.Array, layer: str) -> None:
  """Writes running statistics, which carry no gradient, into ``variable``."""
  try:
    variable[...] = jax.lax.stop_gradient(new_value)
  except errors.TraceContextError as error:
    raise errors.TraceContextError(
        f"{layer} in training updates its running statistics, but it was called inside a JAX "
        f"transform that closes over the model instead of taking it as an argument; pass "
        f"the model in, e.g. nnx.vmap(lambda model, x: model(x), in_axes=(None, 1), "
        f"axis_name='batch') or nnx.eval_shape(lambda model, x: model(x), model, x), or call "
        f"nnx.view(model, use_running_average=True) if the statistics should not change"
    ) from error


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
  unchanged; the running variance averages the unbiased batch variance (as PyTorch).

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
    y, running = bn.batch_norm(
        x, bn.BatchStats(self.mean[...], self.var[...]), value(self.scale), value(self.bias),
        training=training, axis=feature_axes, momentum=self.momentum, epsilon=self.epsilon,
        where=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        dtype=self._output_dtype(x))
    if training:
      self._store(running)
    return y

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
    x = checks.float_input(x, layer)
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

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x``; in training, also updates ``mean``, ``var`` and ``step``."""
    x, feature_axes, training = self._prepare(x, use_running_average)
    y, running = renorm.batch_renorm(
        x, renorm.RenormStats(self.mean[...], self.var[...], self.step[...]),
        value(self.scale), value(self.bias), training=training, rmax=self.rmax,
        dmax=self.dmax, axis=feature_axes, momentum=self.momentum, epsilon=self.epsilon,
        where=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        dtype=self._output_dtype(x))
    if training:
      self._store(running)
    return y


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

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x`` per virtual batch; in training, also updates ``mean`` and ``var``."""
    x, feature_axes, training = self._prepare(x, use_running_average)
    y, running = variants.ghost_batch_norm(
        x, bn.BatchStats(self.mean[...], self.var[...]), value(self.scale), value(self.bias),
        training=training, virtual_batch_size=self.virtual_batch_size, axis=feature_axes,
        momentum=self.momentum, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self._output_dtype(x))
    if training:
      self._store(running)
    return y


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

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x``; in training, also updates ``mean`` and ``var``."""
    x, feature_axes, training = self._prepare(x, use_running_average)
    y, running = variants.lp_batch_norm(
        x, bn.BatchStats(self.mean[...], self.var[...]), value(self.scale), value(self.bias),
        training=training, p=self.p, axis=feature_axes, momentum=self.momentum,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self._output_dtype(x))
    if training:
      self._store(running)
    return y


class LayerNorm(nnx.Module):
  """Layer normalization (Ba, Kiros and Hinton 2016), drop-in for ``flax.nnx.LayerNorm``.

  .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot \\gamma
     + \\beta

  with the statistics of each example over ``reduction_axes`` (:func:`jaxnorm.layer_norm`).
  Arguments as ``flax.nnx.LayerNorm``; ``num_features`` may be a tuple when ``feature_axes``
  names several axes.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.LayerNorm(2, epsilon=0.0)(jnp.array([[1e4 + 1.0, 1e4 - 1.0]]))
    Array([[ 1., -1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.scale, self.bias = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    """Normalizes each example of ``x``; ``mask`` selects the elements that enter the stats."""
    x = checks.float_input(x, "LayerNorm")
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="LayerNorm", name="feature_axes")
    return functional.layer_norm(
        x, value(self.scale), value(self.bias), reduction_axes=self.reduction_axes,
        feature_axes=feature_axes, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class RMSNorm(nnx.Module):
  """Root mean square normalization (Zhang and Sennrich 2019), drop-in for ``flax.nnx.RMSNorm``.

  .. math:: y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}} \\cdot \\gamma

  over ``reduction_axes`` (:func:`jaxnorm.rms_norm`). Arguments as ``flax.nnx.RMSNorm``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.RMSNorm(2, epsilon=0.0)(jnp.array([[3.0, -3.0]]))
    Array([[ 1., -1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.scale, _ = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=False,
        scale_init=scale_init, bias_init=None, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=NO_METADATA)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, mask=None):
    """Normalizes each example of ``x``; ``mask`` selects the elements that enter the stats."""
    x = checks.float_input(x, "RMSNorm")
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="RMSNorm", name="feature_axes")
    return functional.rms_norm(
        x, value(self.scale), reduction_axes=self.reduction_axes, feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class GroupNorm(nnx.Module):
  """Group normalization (Wu and He 2018), drop-in for ``flax.nnx.GroupNorm`` (channels last).

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)}
     + \\epsilon}} \\cdot \\gamma_c + \\beta_c

  over each group of ``num_features / num_groups`` consecutive channels
  (:func:`jaxnorm.group_norm`). Unlike Flax's, it accepts a mask that broadcasts, such as
  ``(N, H, W, 1)``. Give exactly one of ``num_groups`` and ``group_size``; both are then set.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.GroupNorm(4, num_groups=2, epsilon=0.0)(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes | None = None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.num_groups = functional.num_groups_for(num_features, num_groups, group_size,
                                                (num_features,))
    self.group_size = num_features // self.num_groups
    self.scale, self.bias = scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    """Normalizes each example of ``x`` per group of channels (the last axis)."""
    x = checks.float_input(x, "GroupNorm")
    check_features(x, -1, (self.num_features,), layer="GroupNorm", name="the last axis")
    return functional.group_norm(
        x, value(self.scale), value(self.bias), num_groups=self.num_groups,
        epsilon=self.epsilon, reduction_axes=self.reduction_axes, where=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class InstanceNorm(nnx.Module):
  """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.nnx.InstanceNorm``.

  .. math:: y_{n,\\dots,c} = \\frac{x_{n,\\dots,c} - \\mu_{n,c}}{\\sqrt{\\sigma^2_{n,c}
     + \\epsilon}} \\cdot \\gamma_c + \\beta_c

  with the statistics of each example and channel over the remaining axes
  (:func:`jaxnorm.instance_norm`). Arguments as ``flax.nnx.InstanceNorm``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> jnnx.InstanceNorm(2, epsilon=0.0)(jnp.array([[[1.0, 10.0], [3.0, 30.0]]]))[0]
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """

  def __init__(
      self,
      num_features: Features,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = None,
      rngs: nnx.Rngs | None = None,
      bias_metadata: Mapping[str, Any] = NO_METADATA,
      scale_metadata: Mapping[str, Any] = NO_METADATA,
  ):
    self.scale, self.bias = scale_and_bias(
        feature_shape_of(num_features), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    """Normalizes each example and channel of ``x`` over its other axes."""
    x = checks.float_input(x, "InstanceNorm")
    feature_axes = check_features(x, self.feature_axes, feature_shape_of(self.num_features),
                                  layer="InstanceNorm", name="feature_axes")
    return functional.instance_norm(
        x, value(self.scale), value(self.bias), feature_axes=feature_axes,
        epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, dtype=self.dtype)


@nnx.register_variable_name(linen_input.COLLECTION, overwrite=True)
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
    return [InputStat(linen_input.stat_array(getter(stats))) for getter, _ in fields.values()]
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
