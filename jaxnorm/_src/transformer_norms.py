"""The norms of transformers: QK-norm and the fused residual add + norm, as pure functions.

Each is a thin composition over the engine's layer and RMS norms
(:func:`jaxnorm.layer_norm`, :func:`jaxnorm.rms_norm`): statistics in float32 or wider with the
stable moments, every mask and device option, and the zero-centred ``scale_offset``.

- :func:`qk_norm` (and :func:`head_norm` for one tensor) normalizes queries and keys over
  ``head_dim``, with one scale per head or one shared by every head.
- :func:`add_layer_norm` and :func:`add_rms_norm` take the pre-norm transformer's
  ``h = x + residual; y = norm(h)`` in one call and return both.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import dispatch
from jaxnorm._src import functional
from jaxnorm._src import normalize as normalize_lib
from jaxnorm._src.moments import AxisName, Axes, Groups

NORM_KINDS = ("layer", "rms")


def norm_kind(kind: str, name: str) -> str:
  """Checks that ``kind`` names a norm of :data:`NORM_KINDS`."""
  if kind not in NORM_KINDS:
    raise ValueError(f"{name}: kind={kind!r} is not a norm; use kind='layer' (LayerNorm, as "
                     f"flax's normalize_qk) or kind='rms' (RMSNorm)")
  return kind


def head_scale_axes(x: Array, scale: ArrayLike | None, name: str) -> tuple[int, ...]:
  """The feature axes of a head norm's scale: ``(-1,)`` shared, ``(-2, -1)`` per head."""
  if scale is None or jnp.ndim(scale) <= 1:
    return (x.ndim - 1,)
  heads, head_dim = x.shape[-2:]
  if jnp.ndim(scale) == 2 and x.ndim >= 2:
    return (x.ndim - 2, x.ndim - 1)
  raise ValueError(
      f"{name} of shape {jnp.shape(scale)} does not fit x.shape={x.shape}; give ({head_dim},) "
      f"for a scale shared by every head, or ({heads}, {head_dim}) for one scale per head")


def head_norm(x: ArrayLike, scale: ArrayLike | None = None, *, kind: str = "layer",
              epsilon: float = 1e-6, scale_offset: float = 0.0, dtype: Any = None) -> Array:
  """Normalizes each head of ``x`` (..., heads, head_dim) over ``head_dim``.

  .. math:: y_{\\dots,h,:} = \\operatorname{norm}(x_{\\dots,h,:}) \\cdot (\\gamma_h + o)

  with ``norm`` layer norm (``kind="layer"``) or RMS norm (``kind="rms"``), and :math:`\\gamma`
  of shape ``(head_dim,)`` (shared by every head) or ``(heads, head_dim)`` (one per head).

  Args:
    x: queries or keys, ``head_dim`` last and heads before it.
    scale: optional :math:`\\gamma`, shared or per head.
    kind: ``"layer"`` or ``"rms"``.
    epsilon: added to the variance (or mean square).
    scale_offset: :math:`o`, for a zero-centred scale (1.0: :math:`1 + \\gamma`).
    dtype: output dtype (default: result type of x and scale).

  Returns:
    ``x`` normalized, of its shape.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> q = jnp.array([[[3.0, -3.0], [1e4 + 1.0, 1e4 - 1.0]]])  # (seq 1, heads 2, head_dim 2)
    >>> jaxnorm.head_norm(q, jnp.array([[1.0, 1.0], [2.0, 2.0]]), epsilon=0.0)
    Array([[[ 1., -1.],
            [ 2., -2.]]], dtype=float32)
  """
  x = checks.float_input(x, "head_norm")
  if x.ndim < 1:
    raise ValueError(f"head_norm needs x with head_dim last; got a scalar of shape {x.shape}")
  feature_axes = head_scale_axes(x, scale, "scale")
  if norm_kind(kind, "head_norm") == "rms":
    return functional.rms_norm(x, scale, reduction_axes=-1, feature_axes=feature_axes,
                               epsilon=epsilon, dtype=dtype, scale_offset=scale_offset)
  return functional.layer_norm(x, scale, None, reduction_axes=-1, feature_axes=feature_axes,
                               epsilon=epsilon, dtype=dtype, scale_offset=scale_offset)


def check_query_key(query: Array, key: Array) -> None:
  """Raises unless query and key are ``(..., heads, head_dim)`` with the same ``head_dim``."""
  for name, x in (("query", query), ("key", key)):
    if x.ndim < 2:
      raise ValueError(f"qk_norm: {name} of shape {x.shape} needs at least (heads, head_dim); "
                       f"reshape it to (batch, seq, heads, head_dim)")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
        f"qk_norm: query.shape={query.shape} and key.shape={key.shape} differ in head_dim "
        f"({query.shape[-1]} vs {key.shape[-1]}); attention needs q . k over one head_dim: "
        f"project both to the same head_dim")


def qk_norm(query: ArrayLike, key: ArrayLike, query_scale: ArrayLike | None = None,
            key_scale: ArrayLike | None = None, *, kind: str = "layer", epsilon: float = 1e-6,
            scale_offset: float = 0.0, dtype: Any = None) -> tuple[Array, Array]:
  """QK-norm: queries and keys normalized per head over ``head_dim`` before attention.

  .. math:: q' = \\operatorname{norm}(q) \\cdot \\gamma_q, \\qquad
     k' = \\operatorname{norm}(k) \\cdot \\gamma_k, \\qquad
     \\text{logits} = q' k'^\\top / \\sqrt{d}

  Normalizing bounds the attention logits, which otherwise grow without bound at large learning
  rates and collapse the softmax to one-hot (Dehghani et al. 2023, "Scaling Vision Transformers
  to 22 Billion Parameters"; Wortsman et al. 2023, "Small-scale proxies for large-scale
  Transformer training instabilities"). ``flax.linen.MultiHeadDotProductAttention(normalize_qk=
  True)`` is this with ``kind="layer"`` and shared scales; the layers
  ``jaxnorm.linen.QKNormAttention`` and ``jaxnorm.nnx.HeadNorm`` fit flax's attention.

  Args:
    query: ``(batch, seq, heads, head_dim)`` (any leading axes).
    key: ``(batch, seq_k, kv_heads, head_dim)``: the same ``head_dim``; heads may differ
      (grouped-query attention).
    query_scale, key_scale: optional scales, ``(head_dim,)`` shared or ``(heads, head_dim)``.
    kind: ``"layer"`` (the papers', flax's) or ``"rms"``.
    epsilon, scale_offset, dtype: as :func:`head_norm`.

  Returns:
    ``(query, key)`` normalized.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> q = jnp.array([4.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)  # (batch, seq, heads, head_dim)
    >>> k = jnp.array([0.0, -8.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    >>> q, k = jaxnorm.qk_norm(q, k, kind="rms", epsilon=0.0)
    >>> q.ravel(), k.ravel()
    (Array([2., 0., 0., 0.], dtype=float32), Array([ 0., -2.,  0.,  0.], dtype=float32))
  """
  query = checks.float_input(query, "qk_norm")
  key = checks.float_input(key, "qk_norm")
  check_query_key(query, key)
  options = dict(kind=kind, epsilon=epsilon, scale_offset=scale_offset, dtype=dtype)
  return head_norm(query, query_scale, **options), head_norm(key, key_scale, **options)


def checked_pair(x: ArrayLike, residual: ArrayLike, residual_dtype: Any,
                 name: str) -> tuple[Array, Array, Any]:
  """``x`` and ``residual`` as float arrays of one shape, and the dtype of their sum
  (``residual_dtype``, default their result type)."""
  x = checks.float_input(x, name)
  residual = checks.float_input(residual, name)
  if x.shape != residual.shape:
    raise ValueError(
        f"{name}: x.shape={x.shape} and residual.shape={residual.shape} differ; the residual "
        f"stream and the branch added to it need one shape (project the branch back to "
        f"{residual.shape[-1]} features)")
  return x, residual, jnp.dtype(residual_dtype or jnp.result_type(x, residual))


def fused_rows(x: ArrayLike, residual: ArrayLike, residual_dtype: Any, reduction_axes: Axes,
               feature_axes: Axes, where: ArrayLike | None, axis_name: AxisName | None,
               name: str, per_feature: bool = True):
  """The checked arguments of a fused add + norm where it is one dispatched row operation
  (:func:`functional.takes_rows`): ``(x, residual, axes, feature_axes, where, sum_dtype)``;
  ``None`` where the add and the norm go apart (over devices, or a per-channel layer norm)."""
  x, residual, sum_dtype = checked_pair(x, residual, residual_dtype, name)
  feature_axes = checks.canonical_axes(feature_axes, x.ndim, name="feature_axes", shape=x.shape)
  axes = checks.canonical_axes(reduction_axes, x.ndim, shape=x.shape)
  if not all(functional.takes_rows(a, axes, feature_axes if per_feature else None, axis_name)
             for a in (x, residual)):
    return None
  return x, residual, axes, feature_axes, checks.broadcast_mask(where, x.shape), sum_dtype


def residual_sum(x: ArrayLike, residual: ArrayLike, residual_dtype: Any, name: str) -> Array:
  """``x + residual`` in ``residual_dtype`` (default: their result type), shapes checked."""
  x, residual, dtype = checked_pair(x, residual, residual_dtype, name)
  return normalize_lib.residual_add(x, residual, dtype)


def branch_dtype(x: ArrayLike, *params: ArrayLike | None, dtype: Any = None) -> Any:
  """``dtype``, or the result type of the branch ``x`` and the parameters given (not of the
  residual stream: with a float32 ``residual_dtype``, a bfloat16 branch keeps a bfloat16 ``y``)."""
  return dtype or jnp.result_type(x, *(jnp.asarray(p) for p in params if p is not None))


def add_layer_norm(x: ArrayLike, residual: ArrayLike, scale: ArrayLike | None = None,
                   bias: ArrayLike | None = None, *, reduction_axes: Axes = -1,
                   feature_axes: Axes = -1, epsilon: float = 1e-6,
                   where: ArrayLike | None = None, axis_name: AxisName | None = None,
                   axis_index_groups: Groups = None, dtype: Any = None,
                   residual_dtype: Any = None, scale_offset: float = 0.0) -> tuple[Array, Array]:
  """Residual add then layer norm, the pre-norm transformer step: returns ``(y, h)``.

  .. math:: h = x + r, \\qquad y = \\frac{h - \\mathrm{E}[h]}{\\sqrt{\\mathrm{Var}[h] +
     \\epsilon}} \\cdot (\\gamma + o) + \\beta

  ``h`` is the new residual stream, ``y`` the input of the next branch. ``y`` is the layer
  norm of ``h`` as returned (after rounding to ``residual_dtype``), so that ``y`` and ``h``
  agree exactly; its statistics are reduced in float32 or wider. Options as
  :func:`jaxnorm.layer_norm`. On one device the add and the norm are one dispatched operation,
  ``"add_normalize_rows"``: under ``jit`` XLA fuses the add into the norm's passes (what it
  moves, against the add and the norm written apart, is measured by
  ``benchmarks/fused_add_norm.py``); under ``jaxnorm.kernels("pallas")`` one kernel reads ``x``
  and ``residual`` once and writes ``h`` and ``y`` (its backward reads ``h``, ``dy`` and
  ``dh`` once).

  Args:
    x: the branch output (attention or MLP).
    residual: the residual stream, of x's shape.
    scale, bias: optional :math:`\\gamma`, :math:`\\beta` of the feature shape.
    residual_dtype: dtype of ``h`` (default: result type of x and residual); float32 keeps a
      bfloat16 model's residual stream in float32.
    dtype: dtype of ``y`` (default: result type of x, scale and bias).

  Returns:
    ``(y, h)``.

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> y, h = jaxnorm.add_layer_norm(jnp.array([[1.0, -1.0]]), jnp.array([[1e4, 1e4]]),
    ...                               epsilon=0.0)
    >>> y, h
    (Array([[ 1., -1.]], dtype=float32), Array([[10001.,  9999.]], dtype=float32))
  """
  fused = fused_rows(x, residual, residual_dtype, reduction_axes, feature_axes, where,
                     axis_name, "add_layer_norm")
  out_dtype = branch_dtype(x, scale, bias, dtype=dtype)
  if fused is not None:
    x, residual, axes, feature_axes, where, sum_dtype = fused
    scale, out_dtype = functional.offset_scale(x, scale, bias, scale_offset, out_dtype,
                                               "add_layer_norm")
    scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
    bias = checks.feature_param(bias, x.shape, feature_axes, "bias")
    op = dispatch.path("add_normalize_rows", normalize_lib.add_normalize_rows)
    return op(x, residual, where, scale, bias, axes, epsilon, residual_dtype=sum_dtype,
              out_dtype=out_dtype)
  h = residual_sum(x, residual, residual_dtype, "add_layer_norm")
  y = functional.layer_norm(
      h, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
      epsilon=epsilon, where=where, axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=out_dtype, scale_offset=scale_offset)
  return y, h


def add_rms_norm(x: ArrayLike, residual: ArrayLike, scale: ArrayLike | None = None, *,
                 reduction_axes: Axes = -1, feature_axes: Axes = -1, epsilon: float = 1e-6,
                 where: ArrayLike | None = None, axis_name: AxisName | None = None,
                 axis_index_groups: Groups = None, dtype: Any = None,
                 residual_dtype: Any = None, scale_offset: float = 0.0) -> tuple[Array, Array]:
  """Residual add then RMS norm: returns ``(y, h)``, as :func:`add_layer_norm`.

  .. math:: h = x + r, \\qquad y = \\frac{h}{\\sqrt{\\mathrm{E}[h^2] + \\epsilon}} \\cdot
     (\\gamma + o)

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> y, h = jaxnorm.add_rms_norm(jnp.array([[1.0, -1.0]]), jnp.array([[2.0, -2.0]]),
    ...                             jnp.zeros(2), epsilon=0.0, scale_offset=1.0)
    >>> y, h
    (Array([[ 1., -1.]], dtype=float32), Array([[ 3., -3.]], dtype=float32))
  """
  fused = fused_rows(x, residual, residual_dtype, reduction_axes, feature_axes, where,
                     axis_name, "add_rms_norm", per_feature=False)
  out_dtype = branch_dtype(x, scale, dtype=dtype)
  if fused is not None:
    x, residual, axes, feature_axes, where, sum_dtype = fused
    scale, out_dtype = functional.offset_scale(x, scale, None, scale_offset, out_dtype,
                                               "add_rms_norm")
    scale = checks.feature_param(scale, x.shape, feature_axes, "scale")
    op = dispatch.path("add_rms_rows", normalize_lib.add_rms_rows)
    return op(x, residual, where, scale, axes, epsilon, residual_dtype=sum_dtype,
              out_dtype=out_dtype)
  h = residual_sum(x, residual, residual_dtype, "add_rms_norm")
  y = functional.rms_norm(
      h, scale, reduction_axes=reduction_axes, feature_axes=feature_axes, epsilon=epsilon,
      where=where, axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=out_dtype, scale_offset=scale_offset)
  return y, h
