"""Frozen batch norm: running statistics used as in evaluation, and kept fixed, while fine-tuning.

Fine-tuned detection and segmentation backbones keep batch norm frozen (torchvision's
``FrozenBatchNorm2d``, detectron2's ``convert_frozen_batchnorm``, timm's
``freeze_batch_norm_2d``): each layer normalizes with its running statistics and never updates
them, and often its scale and bias are not trained either. Here:

- :func:`frozen_batch_norm` (Linen): inside the context, every batch-norm layer (jaxnorm's and
  ``flax.linen.BatchNorm``, in any nesting) behaves as with ``use_running_average=True``
  whatever the model passes, through flax's method interception (``nn.intercept_methods``).
- :func:`batch_norm_param_mask` and :func:`batch_norm_param_labels` (Linen): which parameters
  belong to batch-norm layers, for ``optax.masked`` and ``optax.multi_transform``.
- NNX needs no context: ``model.set_attributes(use_running_average=True,
  raise_if_not_found=False)`` freezes every batch-norm layer in place (flax's own tool), and
  :func:`batch_norm_param_filter` selects their parameters for ``nnx.Optimizer(..., wrt=...)``.

This file also holds what :mod:`jaxnorm._src.population` shares with freezing: which layers
are batch norms, and calling one in a forced mode.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax import traverse_util

from jaxnorm._src import linen_norms
from jaxnorm._src import linen_transformer_norms
from jaxnorm._src import nnx_batch_norms

#: Linen layers that hold ``batch_stats/mean`` and ``/var`` and normalize a training batch with
#: its own statistics (subclasses included: BatchRenorm, GhostBatchNorm, LpBatchNorm).
LINEN_BATCH_NORMS = (linen_norms.BatchNorm, linen_transformer_norms.ConditionalBatchNorm,
                     nn.BatchNorm)
#: The same for NNX (jaxnorm's ConditionalBatchNorm subclasses its BatchNorm).
NNX_BATCH_NORMS = (nnx_batch_norms.BatchNorm, nnx.BatchNorm)


def is_linen_batch_norm_call(context) -> bool:
  """Whether an intercepted Linen call (``nn.intercept_methods``) is a batch norm's forward."""
  return context.method_name == "__call__" and isinstance(context.module, LINEN_BATCH_NORMS)


def call_arguments(module: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments:
  """The arguments of ``module.__call__(*args, **kwargs)`` bound to its parameter names."""
  return inspect.signature(type(module).__call__).bind(module, *args, **kwargs)


def call_in_mode(call: Callable[..., Any], module: Any, args: tuple, kwargs: dict,
                 use_running_average: bool) -> Any:
  """``call(*args, **kwargs)`` with the batch-norm ``module`` in the given mode.

  Whatever the call passes and the module holds, ``use_running_average`` is the given value:
  it is set on the module for the call (restored after) and a value passed in the call is
  dropped, so that flax's ``nn.merge_param`` sees one of the two. ``call`` takes the arguments
  without ``self`` (an interceptor's ``next_fun``, or a bound method).
  """
  bound = call_arguments(module, args, kwargs)
  if "use_running_average" in bound.arguments:
    bound.arguments["use_running_average"] = None
  saved = module.use_running_average
  object.__setattr__(module, "use_running_average", use_running_average)
  try:
    return call(*bound.args[1:], **bound.kwargs)
  finally:
    object.__setattr__(module, "use_running_average", saved)


@contextlib.contextmanager
def frozen_batch_norm() -> Iterator[None]:
  """Every Linen batch-norm layer uses and keeps its running statistics inside the context.

  Each call of a batch-norm layer (jaxnorm's ``BatchNorm``, ``BatchRenorm``,
  ``GhostBatchNorm``, ``LpBatchNorm``, ``ConditionalBatchNorm`` and ``flax.linen.BatchNorm``,
  in any nesting) behaves as with ``use_running_average=True``, whatever the model passes:
  it normalizes with ``batch_stats`` and leaves them unchanged. Other layers (dropout
  included) are untouched. To freeze scale and bias too, mask them out of the optimizer with
  :func:`batch_norm_param_mask` or :func:`batch_norm_param_labels`.

  The context acts while a function is traced: trace (first call a ``jax.jit`` function) inside
  it. A jitted function traced outside keeps its trace when called inside, and the other way
  round; use a separate jitted function for frozen steps.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> layer = jnn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> with jnn.frozen_batch_norm():
    ...   y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> y[0].round(4)            # normalized with the running mean 0 and variance 1
    Array([0., 1.], dtype=float32)
    >>> updates["batch_stats"]["mean"]
    Array([0., 0.], dtype=float32)
  """
  def interceptor(next_fun, args, kwargs, context):
    if is_linen_batch_norm_call(context):
      return call_in_mode(next_fun, context.module, args, kwargs, True)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def batch_norm_param_mask(variables: Mapping[str, Any]) -> dict:
  """A tree of ``variables["params"]``'s structure: True for the parameters of batch norms.

  A module's parameters are a batch norm's when the module holds ``batch_stats/mean`` and
  ``batch_stats/var`` (every jaxnorm and flax batch-norm layer does, at any depth). Freeze them
  with ``optax.masked(optax.set_to_zero(), mask)`` chained before the optimizer, or train only
  them with ``optax.masked(tx, mask)``.

  Args:
    variables: a Linen variables dict with ``params`` and ``batch_stats``.

  Returns:
    A nested dict of bools with the structure of ``variables["params"]``.

  Raises:
    ValueError: without ``params`` or ``batch_stats``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnn
    >>> model = nn.Sequential([nn.Dense(3), jnn.BatchNorm(use_running_average=True)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> jnn.batch_norm_param_mask(variables)
    {'layers_0': {'kernel': False, 'bias': False}, 'layers_1': {'scale': True, 'bias': True}}
  """
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      raise ValueError(
          f"batch_norm_param_mask needs the whole variables dict (with 'params' and "
          f"'batch_stats'), got the collections {sorted(variables)}; pass model.init(...)'s "
          f"result, not variables['params']")
  stats = traverse_util.flatten_dict(dict(variables["batch_stats"]))
  owners = {path[:-1] for path in stats if path[-1] == "mean"} & {
      path[:-1] for path in stats if path[-1] == "var"}
  params = traverse_util.flatten_dict(dict(variables["params"]))
  flat = {path: path[:-1] in owners for path in params}
  return traverse_util.unflatten_dict(flat)


def batch_norm_param_labels(variables: Mapping[str, Any], *, batch_norm: str = "batch_norm",
                            other: str = "other") -> dict:
  """Labels for ``optax.multi_transform``: ``batch_norm`` for batch-norm parameters, else ``other``.

  Batch-norm parameters as in :func:`batch_norm_param_mask`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jaxnorm.linen as jnn
    >>> model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> labels = jnn.batch_norm_param_labels(variables, batch_norm="frozen", other="train")
    >>> tx = optax.multi_transform({"train": optax.sgd(0.1), "frozen": optax.set_to_zero()},
    ...                            labels)
    >>> labels["layers_1"]
    {'bias': 'frozen', 'scale': 'frozen'}
  """
  return jax.tree.map(lambda is_bn: batch_norm if is_bn else other,
                      batch_norm_param_mask(variables))


def batch_norm_param_filter(model: nnx.Module) -> Callable[[tuple, Any], bool]:
  """An NNX filter that selects the parameters of every batch-norm layer of ``model``.

  Freezing NNX batch norm takes flax's own tools:
  ``model.set_attributes(use_running_average=True, raise_if_not_found=False)`` makes every
  batch-norm layer (jaxnorm's and ``flax.nnx.BatchNorm``) normalize with its running statistics
  and keep them; ``nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param,
  nnx.Not(batch_norm_param_filter(model))))`` trains every parameter but theirs. Paths are
  relative to ``model``: use the filter on ``model`` itself.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jnnx.BatchNorm(3))
    >>> model.set_attributes(use_running_average=True, raise_if_not_found=False)
    >>> trainable = nnx.All(nnx.Param, nnx.Not(jnnx.batch_norm_param_filter(model)))
    >>> sorted(nnx.state(model, trainable).flat_state())[0][0]
    ('layers', 0, 'bias')
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable)
  """
  prefixes = frozenset(tuple(path) for path, node in nnx.iter_graph(model)
                       if isinstance(node, NNX_BATCH_NORMS))

  def in_batch_norm(path, value) -> bool:
    path = tuple(path)
    return any(path[:n] in prefixes for n in range(len(path)))

  return in_batch_norm
