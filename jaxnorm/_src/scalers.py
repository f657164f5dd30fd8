"""Input scalers with fitted statistics or constants: standardize, min-max, robust, presets.

Every scaler is one per-channel affine map, computed by :func:`rescale` (also the input
layers' formula):

.. math:: y = (x - c) \\cdot \\frac{a}{s} + b

with a centre :math:`c` and spread :math:`s` from the statistics and an output scale :math:`a`
and offset :math:`b`:

=====================  =============  =====================  ===================  =========
scaler                 :math:`c`      :math:`s`              :math:`a`            :math:`b`
=====================  =============  =====================  ===================  =========
``standardize``        mean           std                    1                    0
``minmax``             min            max - min              ``hi - lo``          ``lo``
``robust``             median         q75 - q25              1                    0
=====================  =============  =====================  ===================  =========

Each scaler takes either fitted statistics (``standardize(x, stats)``, the channel axis theirs)
or the constants themselves (``standardize(x, mean, std)``, ``minmax(x, low, high)``,
``robust(x, center, scale)``, the channel axis ``channel_axis=-1`` unless given).

A channel whose spread is 0 (a constant feature) is not divided by zero: its spread counts as 1,
as in scikit-learn, so ``standardize`` and ``robust`` map it to ``x - c`` (0 on the fitted data)
and ``minmax`` to ``lo``. The inverses map back exactly through the same formula.

Integer input (uint8 images) is converted to float32 first; the output is float32 (or
``dtype``), with statistics fitted on the raw values (0 to 255): no division by 255 is needed.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_float(x: ArrayLike) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _per_channel(value: ArrayLike, x: Array, feature_axes: tuple[int, ...], name: str) -> Array:
  """``value`` (one per channel, or a scalar) in float32 or wider, shaped to broadcast to x."""
  value = jnp.asarray(value)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  if not feature_axes:
    if value.size != 1:
      raise ValueError(f"{name} of shape {value.shape} needs channel_axis; with "
                       f"channel_axis=None give one value")
    return value.reshape(())
  return checks.feature_param(value, x.shape, feature_axes, name)


def rescale(x: ArrayLike, center: ArrayLike, spread: ArrayLike, *, out_scale: ArrayLike = 1.0,
            out_bias: ArrayLike = 0.0, channel_axis: int | None = -1,
            dtype: Any = None) -> Array:
  """The per-channel affine map every scaler and input layer uses.

  .. math:: y = (x - c) \\cdot \\frac{a}{s} + b, \\qquad s = 1 \\text{ where } s = 0

  The factor :math:`a / s` is divided once per channel, not per element, in float32 or wider, so
  that ``x / 255`` maps 255 to exactly 1; the subtraction comes first, which keeps data far from
  zero accurate.

  Args:
    x: input (integers are converted to float32).
    center, spread: :math:`c` and :math:`s`, one value per channel of ``channel_axis``.
    out_scale, out_bias: :math:`a` and :math:`b`, scalars or one value per channel.
    channel_axis: the channel axis of ``x``; None for one value for all of ``x``.
    dtype: output dtype (default: float32, or x's float dtype).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.rescale(jnp.array([[1.0, 5.0], [3.0, 5.0]]), jnp.array([2.0, 5.0]),
    ...                 jnp.array([1.0, 0.0]))
    Array([[-1.,  0.],
           [ 1.,  0.]], dtype=float32)
  """
  x = _as_float(x)
  feature_axes = () if channel_axis is None else checks.canonical_axes(
      channel_axis, x.ndim, name="channel_axis", shape=x.shape)
  xf = x.astype(checks.reduction_dtype(x.dtype))
  center = _per_channel(center, x, feature_axes, "center")
  spread = _per_channel(spread, x, feature_axes, "spread")
  factor = _per_channel(out_scale, x, feature_axes, "out_scale") / jnp.where(spread != 0, spread,
                                                                             1)
  yf = (xf - center) * factor.astype(xf.dtype)
  if not (isinstance(out_bias, (int, float)) and out_bias == 0):
    yf = yf + _per_channel(out_bias, x, feature_axes, "out_bias")
  return yf.astype(dtype or x.dtype)


def inverse_rescale(y: ArrayLike, center: ArrayLike, spread: ArrayLike, *,
                    out_scale: ArrayLike = 1.0, out_bias: ArrayLike = 0.0,
                    channel_axis: int | None = -1, dtype: Any = None) -> Array:
  """The inverse of :func:`rescale`: :math:`x = (y - b) \\cdot \\frac{s}{a} + c` (same formula)."""
  spread = jnp.asarray(spread)
  spread = jnp.where(spread != 0, spread, 1).astype(jnp.promote_types(spread.dtype, jnp.float32))
  return rescale(y, out_bias, out_scale, out_scale=spread, out_bias=center,
                 channel_axis=channel_axis, dtype=dtype)


class _Unset:
  def __repr__(self):
    return "<from the statistics, else -1>"


_FROM_STATS = _Unset()


def _is_stats(value: Any) -> bool:
  """Fitted statistics (Stats, or an accumulator, which has ``result``), not constants."""
  return hasattr(value, "channel_axis") and (hasattr(value, "mean") or hasattr(value, "result"))


def _fitted(stats: Any, second: Any, channel_axis: Any, first: str, second_name: str,
            scaler: str) -> tuple[Any, Any]:
  """The statistics (an accumulator's result) and their channel axis; checks the call."""
  if second is not None:
    raise TypeError(
        f"{scaler}(x, stats) takes fitted statistics alone; with constants call "
        f"{scaler}(x, {first}, {second_name}) with arrays, not a Stats and {second_name}")
  if channel_axis is not _FROM_STATS and channel_axis != stats.channel_axis:
    raise ValueError(
        f"channel_axis={channel_axis} differs from the statistics' channel_axis="
        f"{stats.channel_axis}; leave channel_axis out with fitted statistics")
  fitted = stats.result() if hasattr(stats, "result") else stats
  return fitted, stats.channel_axis


def _constants(first: Any, second: Any, channel_axis: Any, first_name: str, second_name: str,
               scaler: str) -> int | None:
  if second is None:
    raise TypeError(
        f"{scaler}(x, {first_name}, {second_name}) needs both constants (or one fitted "
        f"jaxnorm.Stats: {scaler}(x, stats)); got {first_name} of type {type(first).__name__} "
        f"and no {second_name}")
  return -1 if channel_axis is _FROM_STATS else channel_axis


def standardize(x: ArrayLike, mean: Any, std: ArrayLike | None = None, *,
                channel_axis: int | None | _Unset = _FROM_STATS, dtype: Any = None) -> Array:
  """Standardizes ``x`` per channel: :math:`y = (x - \\mu) / \\sigma`.

  With fitted statistics, ``standardize(x, stats)`` (scikit-learn's ``StandardScaler``, biased
  std); with constants, ``standardize(x, mean, std)`` (torchvision's ``normalize``, a paper's
  mean and std). A constant channel (:math:`\\sigma = 0`) becomes :math:`x - \\mu`.

  Args:
    x: input (uint8 allowed), channels along the statistics' ``channel_axis``.
    mean: a :class:`jaxnorm.Stats` (or :class:`jaxnorm.StatsAccumulator`), or the per-channel
      mean (or one scalar).
    std: with constants, the per-channel standard deviation; omit it with statistics.
    channel_axis: with constants, the channel axis of ``x`` (default -1; None for scalars).
    dtype: output dtype.

  Example:
    >>> import numpy as np, jaxnorm
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> jaxnorm.standardize(x, jaxnorm.fit_stats(x))
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> jaxnorm.standardize(x, mean=[2.0, 20.0], std=[1.0, 10.0])
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  if _is_stats(mean):
    stats, axis = _fitted(mean, std, channel_axis, "mean", "std", "standardize")
    mean, std = stats.mean, stats.std
  else:
    axis = _constants(mean, std, channel_axis, "mean", "std", "standardize")
  return rescale(x, mean, std, channel_axis=axis, dtype=dtype)


def inverse_standardize(y: ArrayLike, mean: Any, std: ArrayLike | None = None, *,
                        channel_axis: int | None | _Unset = _FROM_STATS,
                        dtype: Any = None) -> Array:
  """The inverse of :func:`standardize`: :math:`x = y \\sigma + \\mu` (same arguments)."""
  if _is_stats(mean):
    stats, axis = _fitted(mean, std, channel_axis, "mean", "std", "inverse_standardize")
    mean, std = stats.mean, stats.std
  else:
    axis = _constants(mean, std, channel_axis, "mean", "std", "inverse_standardize")
  return inverse_rescale(y, mean, std, channel_axis=axis, dtype=dtype)


def check_range(feature_range: tuple[float, float]) -> tuple[float, float]:
  low, high = feature_range
  if not low < high:
    raise ValueError(f"feature_range={feature_range} must be (low, high) with low < high, "
                     f"e.g. (0, 1) or (-1, 1)")
  return float(low), float(high)


def _minmax_args(low, high, channel_axis, scaler):
  if _is_stats(low):
    stats, axis = _fitted(low, high, channel_axis, "low", "high", scaler)
    return stats.min, stats.max, axis
  return low, high, _constants(low, high, channel_axis, "low", "high", scaler)


def minmax(x: ArrayLike, low: Any, high: ArrayLike | None = None, *,
           feature_range: tuple[float, float] = (0.0, 1.0), clip: bool = False,
           channel_axis: int | None | _Unset = _FROM_STATS, dtype: Any = None) -> Array:
  """Maps each channel's ``[low, high]`` onto ``feature_range`` (scikit-learn's MinMaxScaler).

  .. math:: y = \\frac{x - \\mathrm{low}}{\\mathrm{high} - \\mathrm{low}}
     (b - a) + a, \\qquad (a, b) = \\mathtt{feature\\_range}

  ``minmax(x, stats)`` takes ``low`` and ``high`` from the fitted min and max;
  ``minmax(x, low, high)`` takes constants (say 0 and 255). A constant channel (high = low) maps
  to :math:`a`. With ``clip``, values outside the range are clipped to ``feature_range``.

  Args:
    x: input (uint8 allowed).
    low: a :class:`jaxnorm.Stats`, or the per-channel low end of the input range.
    high: with constants, the per-channel high end; omit it with statistics.
    feature_range: the output range :math:`(a, b)`.
    clip: clip the output to ``feature_range``.
    channel_axis: with constants, the channel axis of ``x`` (default -1).
    dtype: output dtype.

  Example:
    >>> import numpy as np, jaxnorm
    >>> x = np.array([[0.0, 10.0], [4.0, 30.0]])
    >>> jaxnorm.minmax(x, jaxnorm.fit_stats(x), feature_range=(-1, 1))
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> jaxnorm.minmax(np.array([0, 51, 255], np.uint8), 0.0, 255.0, channel_axis=None)
    Array([0. , 0.2, 1. ], dtype=float32)
  """
  a, b = check_range(feature_range)
  low, high, axis = _minmax_args(low, high, channel_axis, "minmax")
  y = rescale(x, low, _spread(high, low), out_scale=b - a, out_bias=a, channel_axis=axis,
              dtype=dtype)
  return jnp.clip(y, a, b) if clip else y


def inverse_minmax(y: ArrayLike, low: Any, high: ArrayLike | None = None, *,
                   feature_range: tuple[float, float] = (0.0, 1.0),
                   channel_axis: int | None | _Unset = _FROM_STATS, dtype: Any = None) -> Array:
  """The inverse of :func:`minmax` (without clipping; same arguments)."""
  a, b = check_range(feature_range)
  low, high, axis = _minmax_args(low, high, channel_axis, "inverse_minmax")
  return inverse_rescale(y, low, _spread(high, low), out_scale=b - a, out_bias=a,
                         channel_axis=axis, dtype=dtype)


def _spread(high: ArrayLike, low: ArrayLike) -> Array:
  """``high - low`` in the statistics' own precision, then in float32 or wider.

  Fitted statistics are float64 NumPy arrays: their difference is taken in float64 on the host
  (exact for nearby values far from zero, such as min 1e8 and max 1e8 + 3), then rounded once.
  JAX arrays (traced statistics) are subtracted in their own dtype.
  """
  if isinstance(high, jax.Array) or isinstance(low, jax.Array):
    spread = jnp.asarray(high) - jnp.asarray(low)
  else:
    spread = jnp.asarray(np.asarray(high) - np.asarray(low))
  return spread.astype(jnp.promote_types(spread.dtype, jnp.float32))


def robust_quantiles(stats: Any, quantile_range: tuple[float, float]) -> tuple[Any, Any]:
  """The per-channel quantiles at ``quantile_range`` (percent) from fitted statistics.

  ``stats`` is a :class:`jaxnorm.Stats` (any whole percent) or a
  :class:`jaxnorm.StatsAccumulator` (any percent).
  """
  low, high = quantile_range
  if not 0 <= low < high <= 100:
    raise ValueError(f"quantile_range={quantile_range} must be (low, high) percentiles with "
                     f"0 <= low < high <= 100, e.g. (25.0, 75.0)")
  fitted = stats.result() if hasattr(stats, "result") else stats
  if fitted.median is None:
    raise ValueError("these statistics hold no quantiles; fit them with "
                     "jaxnorm.fit_stats(..., quantiles=True) for robust scaling")
  if (low, high) == (25, 75):
    return fitted.q25, fitted.q75
  q_low, q_high = stats.quantile([low / 100, high / 100])
  return q_low, q_high


def _robust_args(center, scale, quantile_range, channel_axis, scaler):
  if _is_stats(center):
    stats, axis = _fitted(center, scale, channel_axis, "center", "scale", scaler)
    q_low, q_high = robust_quantiles(center, quantile_range)
    return stats.median, _spread(q_high, q_low), axis
  if quantile_range != (25.0, 75.0):
    raise ValueError(f"quantile_range={quantile_range} applies to fitted statistics only; with "
                     f"constants give the scale itself: {scaler}(x, center, scale)")
  return center, scale, _constants(center, scale, channel_axis, "center", "scale", scaler)


def robust(x: ArrayLike, center: Any, scale: ArrayLike | None = None, *,
           quantile_range: tuple[float, float] = (25.0, 75.0),
           channel_axis: int | None | _Unset = _FROM_STATS, dtype: Any = None) -> Array:
  """Centres on the median and divides by an interquantile range (scikit-learn's RobustScaler).

  .. math:: y = \\frac{x - \\mathrm{median}}{q_{\\mathrm{high}} - q_{\\mathrm{low}}}

  ``robust(x, stats)`` takes the fitted median and quantiles (``quantile_range`` in percent:
  whole percents from :class:`jaxnorm.Stats`, any from a :class:`jaxnorm.StatsAccumulator`);
  ``robust(x, center, scale)`` takes constants. A zero scale counts as 1.

  Args:
    x: input (uint8 allowed).
    center: a :class:`jaxnorm.Stats` or accumulator, or the per-channel centre.
    scale: with constants, the per-channel scale; omit it with statistics.
    quantile_range: with statistics, the percentiles whose difference is the scale.
    channel_axis: with constants, the channel axis of ``x`` (default -1).
    dtype: output dtype.

  Example:
    >>> import numpy as np, jaxnorm
    >>> x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    >>> jaxnorm.robust(x, jaxnorm.fit_stats(x))[:, 0]
    Array([-1. , -0.5,  0. ,  0.5, 49. ], dtype=float32)
    >>> jaxnorm.robust(x, 2.0, 2.0, channel_axis=None)[:, 0]
    Array([-1. , -0.5,  0. ,  0.5, 49. ], dtype=float32)
  """
  center, scale, axis = _robust_args(center, scale, quantile_range, channel_axis, "robust")
  return rescale(x, center, scale, channel_axis=axis, dtype=dtype)


def inverse_robust(y: ArrayLike, center: Any, scale: ArrayLike | None = None, *,
                   quantile_range: tuple[float, float] = (25.0, 75.0),
                   channel_axis: int | None | _Unset = _FROM_STATS, dtype: Any = None) -> Array:
  """The inverse of :func:`robust` (same arguments)."""
  center, scale, axis = _robust_args(center, scale, quantile_range, channel_axis,
                                     "inverse_robust")
  return inverse_rescale(y, center, scale, channel_axis=axis, dtype=dtype)


def pixels_to_unit(x: ArrayLike, *, max_value: float = 255.0, dtype: Any = None) -> Array:
  """Maps pixel values in ``[0, max_value]`` to ``[0, 1]``: ``x / 255`` for uint8 images.

  Example:
    >>> import numpy as np, jaxnorm
    >>> jaxnorm.pixels_to_unit(np.array([0, 51, 255], np.uint8))
    Array([0. , 0.2, 1. ], dtype=float32)
  """
  return rescale(x, 0.0, max_value, channel_axis=None, dtype=dtype)


def pixels_to_symmetric(x: ArrayLike, *, max_value: float = 255.0, dtype: Any = None) -> Array:
  """Maps pixel values in ``[0, max_value]`` to ``[-1, 1]``: ``x / 127.5 - 1`` for uint8.

  Example:
    >>> import numpy as np, jaxnorm
    >>> jaxnorm.pixels_to_symmetric(np.array([0, 255], np.uint8))
    Array([-1.,  1.], dtype=float32)
  """
  return rescale(x, 0.0, max_value, out_scale=2.0, out_bias=-1.0, channel_axis=None,
                 dtype=dtype)


def imagenet_standardize(x: ArrayLike, *, max_value: float = 255.0, channel_axis: int = -1,
                         dtype: Any = None) -> Array:
  """Standardizes RGB pixels in ``[0, max_value]`` with the ImageNet mean and std.

  .. math:: y = (x / m - \\mu) / \\sigma

  with :math:`m` = ``max_value``, :math:`\\mu = (0.485, 0.456, 0.406)` and
  :math:`\\sigma = (0.229, 0.224, 0.225)`, as torchvision and timm use them.

  Example:
    >>> import numpy as np, jaxnorm
    >>> jaxnorm.imagenet_standardize(np.array([[0, 0, 0]], np.uint8))
    Array([[-2.1179 , -2.0357, -1.8044]], dtype=float32)
  """
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * max_value
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * max_value
  return standardize(x, mean, std, channel_axis=channel_axis, dtype=dtype)


INPUT_STATS = "input_stats"
"""The collection (Linen) and variable type name (NNX) of the input layers' statistics."""


def stat_array(value: Any) -> jax.Array:
  """A fitted statistic as a JAX array in its own precision, float32 or wider.

  Fitted statistics are float64: under ``jax_enable_x64`` they stay float64, so spreads such as
  ``max - min`` of data far from zero (min 1e8, max 1e8 + 3) are taken in float64, as the pure
  scalers take them; otherwise they are float32.
  """
  value = jnp.asarray(value)
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))
