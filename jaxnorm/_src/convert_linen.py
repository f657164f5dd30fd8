"""Running a Flax Linen model you did not write on jaxnorm's norms: :func:`use_jaxnorm`.

Inside ``with use_jaxnorm():`` every call of ``flax.linen``'s ``BatchNorm``, ``LayerNorm``,
``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` is intercepted (``nn.intercept_methods``) and
computed by jaxnorm's functions, with the flax module's own variables: the tree at ``init`` is
the same, so checkpoints load either way. Batch norms keep Flax's biased running variance, so
the statistics evolve exactly as they did under Flax, only right far from zero.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import flax.linen as nn

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import functional
from jaxnorm._src import linen_norms

def _batch_norm(module: nn.BatchNorm, x, use_running_average: bool | None = None, *,
                mask=None):
  use_running_average = nn.merge_param(
      "use_running_average", module.use_running_average, use_running_average)
  x, feature_axes, mean, var, scale, bias = linen_norms.declare_batch_norm(module, x,
                                                                          "BatchNorm")
  training = linen_norms.batch_norm_training(module, x, feature_axes, use_running_average)
  initializing = module.is_initializing()
  y, running = bn.batch_norm(
      x, bn.BatchStats(mean.value, var.value), scale, bias, training=training,
      axis=feature_axes, momentum=module.momentum, epsilon=module.epsilon, where=mask,
      axis_name=None if initializing else module.axis_name,
      axis_index_groups=module.axis_index_groups, dtype=module.dtype,
      unbiased_running_var=False)
  linen_norms.store_running_stats(module, training, (mean, var), running)
  return y


def _params(module, shape, use_bias: bool):
  return linen_norms.scale_and_bias(
      module, shape, use_scale=module.use_scale, use_bias=use_bias,
      scale_init=module.scale_init, bias_init=getattr(module, "bias_init", None),
      param_dtype=module.param_dtype)


def _layer_norm(module: nn.LayerNorm, x, *, mask=None):
  x = checks.float_input(x, "LayerNorm", complex_ok=True)
  feature_axes, shape = linen_norms.feature_shape_of(x, module.feature_axes, "feature_axes")
  scale, bias = _params(module, shape, module.use_bias)
  return functional.layer_norm(
      x, scale, bias, reduction_axes=module.reduction_axes, feature_axes=feature_axes,
      epsilon=module.epsilon, where=mask, axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups, dtype=module.dtype)


def _rms_norm(module: nn.RMSNorm, x, *, mask=None):
  x = checks.float_input(x, "RMSNorm", complex_ok=True)
  feature_axes, shape = linen_norms.feature_shape_of(x, module.feature_axes, "feature_axes")
  scale, _ = _params(module, shape, False)
  return functional.rms_norm(
      x, scale, reduction_axes=module.reduction_axes, feature_axes=feature_axes,
      epsilon=module.epsilon, where=mask, axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups, dtype=module.dtype)


def _group_norm(module: nn.GroupNorm, x, *, mask=None):
  x = checks.float_input(x, "GroupNorm", complex_ok=True)
  scale, bias = _params(module, (x.shape[-1],), module.use_bias)
  return functional.group_norm(
      x, scale, bias, num_groups=module.num_groups, group_size=module.group_size,
      epsilon=module.epsilon, reduction_axes=module.reduction_axes, where=mask,
      axis_name=module.axis_name, axis_index_groups=module.axis_index_groups,
      dtype=module.dtype)


def _instance_norm(module: nn.InstanceNorm, x, *, mask=None):
  x = checks.float_input(x, "InstanceNorm", complex_ok=True)
  feature_axes, shape = linen_norms.feature_shape_of(x, module.feature_axes, "feature_axes")
  scale, bias = _params(module, shape, module.use_bias)
  return functional.instance_norm(
      x, scale, bias, feature_axes=feature_axes, epsilon=module.epsilon, where=mask,
      axis_name=module.axis_name, axis_index_groups=module.axis_index_groups,
      dtype=module.dtype)


# flax's layer -> (jaxnorm's call with the flax module's variables, jaxnorm's layer of that name,
# whose fields are the options jaxnorm honours).
ROUTES = {
    nn.BatchNorm: (_batch_norm, linen_norms.BatchNorm),
    nn.LayerNorm: (_layer_norm, linen_norms.LayerNorm),
    nn.RMSNorm: (_rms_norm, linen_norms.RMSNorm),
    nn.GroupNorm: (_group_norm, linen_norms.GroupNorm),
    nn.InstanceNorm: (_instance_norm, linen_norms.InstanceNorm),
}


def _route(module: nn.Module):
  """The flax class whose call ``module`` runs unchanged (itself or a subclass that only adds
  fields), or None for any other module."""
  for flax_class in ROUTES:
    if isinstance(module, flax_class) and type(module).__call__ is flax_class.__call__:
      return flax_class
  return None


def check_convertible(module: nn.Module, flax_class: type) -> None:
  """Raises if ``module`` sets an option that jaxnorm's layer does not honour."""
  known = {field.name for field in dataclasses.fields(ROUTES[flax_class][1])}
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name") or field.name in known or not field.init:
      continue
    value = getattr(module, field.name)
    default = field.default if field.default is not dataclasses.MISSING else None
    if value is not default and value != default:
      raise NotImplementedError(
          f"{type(module).__name__} {module.name!r} sets {field.name}={value!r}, which "
          f"jaxnorm's {flax_class.__name__} cannot honour; run this model without "
          f"jaxnorm.linen.use_jaxnorm(), or leave {field.name} at its default")


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  flax_class = _route(module) if context.method_name == "__call__" else None
  if flax_class is None:
    return next_fun(*args, **kwargs)
  check_convertible(module, flax_class)
  return ROUTES[flax_class][0](module, *args, **kwargs)


@contextlib.contextmanager
def use_jaxnorm() -> Iterator[None]:
  """Within it, flax.linen's norm layers compute with jaxnorm's math, on their own variables.

  ``nn.BatchNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and ``nn.InstanceNorm``
  (and subclasses that do not override ``__call__``), in any nesting, are routed to
  :func:`jaxnorm.batch_norm`, :func:`jaxnorm.layer_norm`, ... with the same variables, so
  ``init`` gives the same tree and a Flax checkpoint runs as it is. What changes: a stable
  variance far from zero, masked statistics pooled by count across devices, and running
  statistics that a non-finite batch leaves alone. The running variance keeps Flax's biased
  rule (``unbiased_running_var=False``), so near zero the statistics evolve as under Flax.
  ``use_fast_variance`` and ``force_float32_reductions`` are ignored (jaxnorm always reduces in
  float32 with the stable variance); any other option jaxnorm has no equivalent for raises a
  ``NotImplementedError`` when its layer is called. The routing holds while the model is
  traced: wrap ``init`` and ``apply`` (or the function ``jax.jit`` traces) in it.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
    >>> x = jnp.array([[1e4 + 1.0, 1e4 - 1.0]])
    >>> layer = nn.LayerNorm(epsilon=0.0)
    >>> with jnn.use_jaxnorm():
    ...   y, _ = layer.init_with_output(jax.random.key(0), x)
    >>> y
    Array([[ 1., -1.]], dtype=float32)
  """
  with nn.intercept_methods(_interceptor):
    yield
