"""Weight normalizations, as pure functions.

Weight norm and spectral norm reparametrize a kernel; weight standardization (plain, and the
scaled one of NF-Nets) standardizes it. (Filter response norm and EvoNorm, which normalize
activations without batch statistics, are in :mod:`jaxnorm._src.response_norms`.) Moments
come from :mod:`jaxnorm._src.moments` (at least float32, stable far from zero); each function
returns its input's dtype, or the result type of the input and parameters, or ``dtype``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib
from jaxnorm._src.normalize import output_dtype

Axes = int | Sequence[int] | None
# (kernel, x) -> y, linear in x: a layer's map from its input, e.g. a convolution.
Operator = Callable[[Array, Array], Array]


def split_axes(kernel: Array, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The canonical feature axes of a kernel (None: none) and the other axes, reduced over."""
  features = () if feature_axes is None else checks.canonical_axes(
      feature_axes, kernel.ndim, name="feature_axes", shape=kernel.shape)
  return features, tuple(a for a in range(kernel.ndim) if a not in features)


def l2_normalize(x: Array, axes: tuple[int, ...] | None, epsilon: float) -> Array:
  """``x / sqrt(sum(x**2) + epsilon)`` over ``axes`` (None: all), as Flax computes it."""
  return x * lax.rsqrt(jnp.sum(x * x, axis=axes, keepdims=True) + epsilon)


def weight_norm(kernel: ArrayLike, scale: ArrayLike | None = None, *, feature_axes: Axes = -1,
                epsilon: float = 1e-12, dtype: Any = None) -> Array:
  """Weight normalization: each feature's weights divided by their L2 norm, then scaled.

  .. math:: \\hat w_{\\cdot j} = g_j\\, \\frac{w_{\\cdot j}}{\\sqrt{\\sum_i w_{ij}^2 + \\epsilon}}

  The norm is over every axis but ``feature_axes`` (None: over the whole kernel), as
  ``flax.linen.WeightNorm`` takes it (Salimans and Kingma 2016).

  Args:
    kernel, scale: the weights, e.g. ``(kh, kw, in, out)``, and an optional gain :math:`g` of
      the feature shape.
    feature_axes, epsilon: the feature axes (default: the last), what the square adds.
    dtype: output dtype (default: result type of kernel and scale).

  Returns:
    The normalized kernel.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.weight_norm(jnp.array([[3.0, 0.0], [4.0, 2.0]]), epsilon=0.0)
    Array([[0.6, 0. ],
           [0.8, 1. ]], dtype=float32)
  """
  kernel = checks.float_input(kernel, "weight_norm")
  features, reduced = split_axes(kernel, feature_axes)
  scale = checks.feature_param(scale, kernel.shape, features, "scale")
  y = l2_normalize(kernel.astype(checks.reduction_dtype(kernel.dtype)), reduced, epsilon)
  if scale is not None:
    y = y * scale
  return y.astype(output_dtype(kernel, scale, dtype=dtype))


class SpectralState(NamedTuple):
  """Spectral norm's state, as Flax's ``.../u`` and ``.../sigma`` (float32 or wider).

  ``u`` estimates the top singular vector: ``(1, out)`` for a kernel (as Flax), ``(1,
  *input_shape)`` for an operator; ``sigma`` is the last estimate of the singular value.
  """
  u: Array
  sigma: Array


def init_spectral_state(key: Array, kernel_shape: Sequence[int], *,
                        input_shape: Sequence[int] | None = None, dtype: Any = jnp.float32,
                        stddev: float = 1.0) -> SpectralState:
  """A random start ``u`` (normal, ``stddev``) and ``sigma = 1``, in float32 or wider.

  ``u`` has shape ``(1, kernel_shape[-1])``, or ``(1, *input_shape)`` for an operator.
  """
  shape = (1, kernel_shape[-1]) if input_shape is None else (1, *input_shape)
  dtype = checks.reduction_dtype(dtype)
  return SpectralState(jax.random.normal(key, shape, dtype) * stddev, jnp.ones((), dtype))


def spectral_norm(kernel: ArrayLike, state: SpectralState, *, n_steps: int = 1,
                  epsilon: float = 1e-12, operator: Operator | None = None,
                  dtype: Any = None) -> tuple[Array, SpectralState]:
  """Spectral normalization: the kernel divided by its largest singular value.

  .. math::

     v \\leftarrow \\frac{A u}{\\lVert A u \\rVert}, \\quad
     u \\leftarrow \\frac{A^\\top v}{\\lVert A^\\top v \\rVert}, \\quad
     \\sigma = v^\\top A u, \\quad \\hat W = W / \\sigma

  ``n_steps`` of power iteration from ``state.u``, in float32 or wider for any kernel dtype;
  :math:`u, v` carry no gradient (Miyato et al. 2018). By default :math:`A u = u W^\\top`, ``W``
  the kernel reshaped to ``(-1, out)``, as ``flax.linen.SpectralNorm``; with an ``operator``
  (:func:`conv_operator`), :math:`A` is that linear map: for a convolution, :math:`\\sigma` is
  its operator norm (Gouk et al. 2021), not the reshaped kernel's, which can be far off.

  Args:
    kernel, state: the weights (2 or more axes), a :class:`SpectralState`
      (:func:`init_spectral_state`).
    n_steps, epsilon: power-iteration steps per call (>= 1), what squared norms add.
    operator: optional ``(kernel, x) -> y``, linear in ``x``; ``state.u`` is one such ``x``.
    dtype: output dtype (default: result type of the kernel and ``state.u``, as Flax).

  Returns:
    ``(kernel / sigma, next_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm
    >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> state = jaxnorm.init_spectral_state(jax.random.key(0), w.shape)
    >>> for _ in range(20):
    ...   w_hat, state = jaxnorm.spectral_norm(w, state)
    >>> round(float(state.sigma), 4), w_hat.round(4)
    (2.0, Array([[1. , 0. ],
           [0. , 0.5]], dtype=float32))
  """
  kernel = checks.float_input(kernel, "spectral_norm")
  if operator is None and kernel.ndim < 2:
    raise ValueError(
        f"spectral_norm got a parameter of shape {kernel.shape}: a 1-d parameter (a bias, a "
        f"scale) has no spectral norm; leave it out (jaxnorm's and flax's SpectralNorm layers "
        f"skip 1-d parameters), or use weight_norm to divide a vector by its L2 norm")
  if n_steps < 1:
    raise ValueError(f"n_steps={n_steps}: power iteration needs n_steps >= 1")
  wf = kernel.astype(checks.reduction_dtype(jnp.promote_types(kernel.dtype, state.u.dtype)))
  u = state.u.astype(wf.dtype)
  fixed = lax.stop_gradient(wf)
  if operator is None:
    matrix, fixed_matrix = wf.reshape(-1, wf.shape[-1]), fixed.reshape(-1, wf.shape[-1])
    if u.shape != (1, matrix.shape[1]):
      raise ValueError(
          f"state.u of shape {u.shape} does not fit the kernel of shape {kernel.shape}: it "
          f"needs (1, {matrix.shape[1]}); start with jaxnorm.init_spectral_state(key, "
          f"{tuple(kernel.shape)})")
    for _ in range(n_steps):
      v = l2_normalize(jnp.matmul(u, fixed_matrix.T), None, epsilon)
      u = l2_normalize(jnp.matmul(v, fixed_matrix), None, epsilon)
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = jnp.matmul(jnp.matmul(v, matrix), u.T)[0, 0]
  else:
    for _ in range(n_steps):
      image, transpose = jax.vjp(lambda x: operator(fixed, x), u)
      v = l2_normalize(image, None, epsilon)
      u = l2_normalize(transpose(v)[0], None, epsilon)
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = jnp.sum(v * operator(wf, u))
  y = wf / jnp.where(sigma != 0, sigma, 1)
  new_state = SpectralState(u.astype(state.u.dtype),
                            lax.stop_gradient(sigma).astype(state.sigma.dtype))
  return y.astype(output_dtype(kernel, state.u, dtype=dtype)), new_state


def conv_operator(*, strides: int | Sequence[int] = 1, padding: Any = "SAME",
                  input_dilation: int | Sequence[int] = 1,
                  kernel_dilation: int | Sequence[int] = 1,
                  feature_group_count: int = 1) -> Operator:
  """The convolution ``(kernel, x) -> y`` of ``flax.linen.Conv`` (channels last, no bias).

  For :func:`spectral_norm`'s ``operator``: ``x`` is ``(1, *spatial, in)``, the kernel
  ``(*window, in // feature_group_count, out)``; ``padding`` is ``"SAME"``, ``"VALID"`` or
  ``(low, high)`` pairs, as ``lax.conv_general_dilated`` takes it.
  """
  def apply(kernel: Array, x: Array) -> Array:
    spatial = kernel.ndim - 2
    def per_axis(value):
      return (value,) * spatial if isinstance(value, int) else tuple(value)
    lhs = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
    rhs = (kernel.ndim - 1, kernel.ndim - 2) + tuple(range(spatial))
    return lax.conv_general_dilated(
        x, kernel, per_axis(strides), padding, lhs_dilation=per_axis(input_dilation),
        rhs_dilation=per_axis(kernel_dilation),
        dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs),
        feature_group_count=feature_group_count)
  return apply


def fan_in_moments(kernel: Array, feature_axes: Axes, name: str) -> tuple[Array, Any, int]:
  """The kernel (reduced dtype), its moments over the non-feature axes, and its fan-in."""
  kernel = checks.float_input(kernel, name)
  _, reduced = split_axes(kernel, feature_axes)
  fan_in = math.prod(kernel.shape[a] for a in reduced)
  if fan_in < 2:
    raise ValueError(
        f"{name}: the kernel of shape {kernel.shape} has one element per output channel "
        f"(axes {reduced} hold {fan_in}), so every standardized weight would be 0; standardize "
        f"kernels with a fan-in of 2 or more, e.g. (kh, kw, in, out) or (in, out), not a bias "
        f"or a 1x1 depthwise kernel")
  moments = moments_lib.pooled_moments(kernel, reduced, None, None)
  return kernel.astype(checks.reduction_dtype(kernel.dtype)), moments, fan_in


def weight_standardize(kernel: ArrayLike, *, epsilon: float = 1e-5,
                       feature_axes: Axes = -1) -> Array:
  """Weight standardization: each output feature's weights to mean 0 and variance 1.

  .. math:: \\hat W_{\\cdot j} = \\frac{W_{\\cdot j} - \\mu_j}{\\sqrt{\\sigma^2_j + \\epsilon}}

  with :math:`\\mu_j, \\sigma^2_j` the mean and (biased) variance over every axis but
  ``feature_axes`` (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization
  and Weight Standardization"; with GroupNorm, the small-batch recipe of BiT). The moments are
  those of :func:`jaxnorm.moments`, accurate at any offset.

  Args:
    kernel: the weights, e.g. ``(kh, kw, in, out)``; at least 2 per output feature.
    epsilon, feature_axes: what the variance adds; the output-feature axes (the last).

  Returns:
    The standardized kernel, in the kernel's dtype.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.weight_standardize(jnp.array([[1.0, 10.0], [3.0, 30.0]]), epsilon=0.0)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  wf, moments, _ = fan_in_moments(kernel, feature_axes, "weight_standardize")
  return moments.standardize(wf, epsilon).astype(jnp.asarray(kernel).dtype)


def scaled_weight_standardize(kernel: ArrayLike, gain: ArrayLike | None = None, *,
                              gamma: float = 1.0, epsilon: float = 1e-4,
                              feature_axes: Axes = -1, dtype: Any = None) -> Array:
  """Scaled weight standardization of NF-Nets, with its per-feature gain.

  .. math:: \\hat W_{\\cdot j} = \\gamma\\, g_j\\, \\frac{W_{\\cdot j} - \\mu_j}
     {\\sqrt{\\max(N \\sigma^2_j, \\epsilon)}}

  with :math:`N` the fan-in (Brock et al. 2021, "Characterizing signal propagation to close the
  performance gap in unnormalized ResNets", and their reference code): a layer's output keeps
  the variance of its input. :math:`\\gamma` is the activation's gain (e.g. 1.7139 after ReLU).

  Args:
    kernel, gain: the weights; an optional learned :math:`g` of the feature shape (ones).
    gamma, epsilon: the constant :math:`\\gamma`; the lower bound of :math:`N \\sigma^2`.
    feature_axes, dtype: the output-feature axes (the last); the output dtype.

  Returns:
    The scaled, standardized kernel.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> jaxnorm.scaled_weight_standardize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]))
    Array([[-1.4142135],
           [ 1.4142135]], dtype=float32)
  """
  wf, moments, fan_in = fan_in_moments(kernel, feature_axes, "scaled_weight_standardize")
  features, _ = split_axes(wf, feature_axes)
  gain = checks.feature_param(gain, wf.shape, features, "gain")
  multiplier = lax.rsqrt(jnp.maximum(moments.var * fan_in, epsilon)) * gamma
  if gain is not None:
    multiplier = multiplier * gain
  return (moments.centred(wf) * multiplier).astype(
      output_dtype(jnp.asarray(kernel), gain, dtype=dtype))
