"""Flax NNX glue shared by every jaxnorm NNX layer: parameters, feature checks, state writes.

Each layer takes ``flax.nnx``'s constructor arguments (``num_features``, ``rngs``, ...), holds
``nnx.Param`` ``scale`` and ``bias`` and, for batch norm, ``nnx.BatchStat`` ``mean`` and ``var``
under Flax's names, and calls one function of :mod:`jaxnorm`: a model can swap a ``flax.nnx``
norm for jaxnorm's and keep its checkpoint.

``use_fast_variance`` and ``promote_dtype`` are accepted so that Flax code runs unchanged;
jaxnorm always reduces in at least float32 with its stable variance and keeps running statistics
in float32 (``flax.nnx`` casts them, and the input, to ``dtype`` first: with ``dtype=bfloat16`` a
running mean of 300.3 becomes 300). ``rngs`` may be omitted when the initializers are constant.
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

from jaxnorm._src import checks

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
                   name: str | None) -> tuple[int, ...]:
  """The canonical feature axes of ``x``, checked against the layer's ``num_features``.

  ``name`` is the layer's argument that names the feature axes, or None for a layer whose
  features are always the last axis (its channels).
  """
  feature_axes = checks.canonical_axes(axes, x.ndim, name=name or "axis", shape=x.shape)
  found = tuple(x.shape[a] for a in feature_axes)
  if found != feature_shape:
    given = feature_shape[0] if len(feature_shape) == 1 else feature_shape
    wanted = found[0] if len(found) == 1 else found
    if name is None:
      raise ValueError(
          f"{layer}(num_features={given}) got x.shape={x.shape}, whose last axis (the "
          f"channels) holds {wanted}; build the layer with num_features={wanted}")
    raise ValueError(
        f"{layer}(num_features={given}) got x.shape={x.shape}, whose {name}={axes} holds "
        f"{wanted} features; build the layer with num_features={wanted}, or set {name} to the "
        f"axes that hold the {given} features")
  return feature_axes


def store(variable: nnx.Variable, new_value: jax.Array, layer: str) -> None:
  """Writes running statistics, which carry no gradient, into ``variable``.

  A value of another dtype replaces the old one (complex input makes the running mean complex,
  where writing into the float32 array would drop the imaginary part).
  """
  new_value = jax.lax.stop_gradient(new_value)
  try:
    if new_value.dtype == variable.get_value().dtype:
      variable[...] = new_value
    else:
      variable.set_value(new_value)
  except errors.TraceContextError as error:
    raise errors.TraceContextError(
        f"{layer} in training updates its running statistics, but it was called inside a JAX "
        f"transform that closes over the model instead of taking it as an argument; pass "
        f"the model in, e.g. nnx.vmap(lambda model, x: model(x), in_axes=(None, 1), "
        f"axis_name='batch') or nnx.eval_shape(lambda model, x: model(x), model, x), or call "
        f"nnx.view(model, use_running_average=True) if the statistics should not change"
    ) from error
