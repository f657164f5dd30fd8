"""Exact population statistics of every batch-norm layer (PreciseBN), for Linen models.

The running averages of batch norm lag the weights: after averaging weights (SWA, an EMA of
the parameters), pruning, a short fine-tune or training with small batches they no longer
describe what each layer sees. Wu and Johnson ("Rethinking 'Batch' in BatchNorm", 2021;
fvcore's ``update_bn_stats``) recompute them over many batches with the model in training
mode. fvcore and ``torch.optim.swa_utils.update_bn`` average per-batch values, which is right
only for equal batches without masks. Here each layer's per-batch :class:`Moments` of its valid
inputs (over every axis but its feature axes, pooled over its ``axis_name``) are merged by
count (:func:`jaxnorm._src.collectives.merge_moments`, Chan's formulas): the result is the
exact mean and variance of all inputs the layer saw, in one pass and O(channels) memory,

.. math::

   n = \\sum_b n_b, \\quad \\mu = \\frac{1}{n}\\sum_b n_b \\mu_b, \\quad
   \\sigma^2 = \\frac{1}{n}\\sum_b n_b\\big(\\sigma_b^2 + (\\mu_b - \\mu)^2\\big),

stored as each layer stores its running variance: :math:`\\sigma^2 n/(n-1)` for jaxnorm's
layers (unbiased, as PyTorch), :math:`\\sigma^2` for flax's and for jaxnorm's with
``unbiased_running_var=False``. The NNX version is
:mod:`jaxnorm._src.population_nnx`.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import core
from flax import nnx
from flax import traverse_util

from jaxnorm._src import batch_norm as bn
from jaxnorm._src import checks
from jaxnorm._src import collectives
from jaxnorm._src import freezing
from jaxnorm._src import linen_norms
from jaxnorm._src import nnx_batch_norms
from jaxnorm._src import moments as moments_lib
from jaxnorm._src.moments import Moments

COLLECTION = "jaxnorm_population"  # where the Linen pass sows each layer's batch moments

SUPPORTED = ("jaxnorm's BatchNorm, BatchRenorm, GhostBatchNorm, LpBatchNorm(p=2), "
             "ConditionalBatchNorm and flax's BatchNorm")


def stores_biased_variance(layer: Any) -> bool:
  """Whether ``layer`` keeps the biased variance in its running ``var``.

  flax's layers do, and jaxnorm's with ``unbiased_running_var=False`` (Flax's rule).
  """
  if isinstance(layer, (nn.BatchNorm, nnx.BatchNorm)):
    return True
  return not getattr(layer, "unbiased_running_var", True)


def layer_moments(layer: Any, x: Any, mask: Any) -> Moments:
  """The moments of one call's valid inputs of a batch-norm ``layer``, feature-shaped.

  Over every axis of ``x`` but the layer's ``axis``, pooled by count over its ``axis_name``
  (and over the shards of an Explicit mesh), as the layer's own training statistics.
  """
  p = getattr(layer, "p", 2)
  if isinstance(layer, (linen_norms.BatchNorm, nnx_batch_norms.BatchNorm)) and p not in (2, 2.0):
    raise ValueError(
        f"recompute_batch_stats: {type(layer).__name__}(p={p!r}) stores the spread of its "
        f"p-norm, whose exact population value needs the population mean first (two passes); "
        f"it supports {SUPPORTED}. Recompute with p=2, or keep the running statistics")
  x = jnp.asarray(x)
  feature_axes = checks.canonical_axes(layer.axis, x.ndim, name="axis", shape=x.shape)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  where = checks.broadcast_mask(mask, x.shape)
  pooled = moments_lib.pooled_moments(x, reduction_axes, where, layer.axis_name,
                                      layer.axis_index_groups)
  return bn.feature_shaped(pooled, feature_axes)


def merge_all(parts: Iterable[Moments]) -> Moments:
  """The moments of the union of ``parts`` (same shapes), merged by count."""
  parts = list(parts)
  if len(parts) == 1:
    return parts[0]
  return collectives.merge_moments(Moments(*(jnp.stack(field) for field in zip(*parts))))


def merge_layers(total: Mapping[Hashable, Moments] | None,
                 batch: Mapping[Hashable, Moments]) -> dict[Hashable, Moments]:
  """Per layer, the moments so far merged with one batch's."""
  if total is None:
    return dict(batch)
  return {key: merge_all((total[key], batch[key])) for key in batch}


def population_stats(moments: Moments, biased: bool, name: str) -> bn.BatchStats:
  """The running statistics a layer stores for the population ``moments``.

  Raises a ValueError naming ``name`` where a channel has no valid input at all (when the
  counts are concrete: outside a ``jit`` that wraps the whole recomputation).
  """
  count = moments.count
  try:
    empty = np.flatnonzero(np.asarray(count).ravel() == 0)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    empty = ()  # traced counts: a jit around the whole pass
  if len(empty):
    raise ValueError(
        f"recompute_batch_stats: the batch-norm layer {name} saw no valid input in "
        f"channel(s) {empty[:8].tolist()} over all batches (every mask False there); pass "
        f"batches with valid elements for every channel")
  var = moments.var if biased else moments.var * count / jnp.maximum(count - 1, 1)
  return bn.BatchStats(moments.mean, var)


def check_batches(total: Mapping | None, model: Any) -> None:
  """Errors for no batch at all, or a model in which no batch-norm layer ran."""
  if total is None:
    raise ValueError("recompute_batch_stats got no batches; pass an iterable of at least one "
                     "batch (a list, or a data loader that yields some)")
  if not total:
    raise ValueError(
        f"recompute_batch_stats found no batch-norm layer in {type(model).__name__}: none of "
        f"{SUPPORTED} ran on the batches. Check the model and the call arguments (a layer "
        f"behind a flag that is off does not run)")


def _mutable(apply_kwargs: dict) -> Any:
  """The collections the pass mutates: the caller's, batch_stats, and the sown moments."""
  mutable = apply_kwargs.pop("mutable", False)
  if mutable is True:
    return True
  if isinstance(mutable, str):
    mutable = [mutable]
  return sorted(set(mutable or ()) | {"batch_stats", COLLECTION})


def recompute_batch_stats(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any],
                          **apply_kwargs) -> Any:
  """Variables with every batch-norm layer's ``batch_stats`` set to its exact population values.

  Runs ``model.apply(variables, batch, **apply_kwargs)`` on each batch, with every batch-norm
  layer in training mode (it normalizes with the batch's statistics, whatever the model
  passes), and merges each layer's moments of its valid inputs by count:

  .. math::

     \\mu = \\frac{1}{n}\\sum_b n_b \\mu_b, \\qquad
     \\sigma^2 = \\frac{1}{n}\\sum_b n_b\\big(\\sigma_b^2 + (\\mu_b - \\mu)^2\\big)

  Unequal batches and masks count exactly (a masked element not at all); this is not an average
  of per-batch values. Layers are found through flax's method interception, in any nesting:
  jaxnorm's ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``LpBatchNorm`` (p=2) and
  ``ConditionalBatchNorm``, and ``flax.linen.BatchNorm``. Each stores the variance as it does
  in training: unbiased (:math:`\\sigma^2 n/(n-1)`) for jaxnorm's, biased for flax's and for
  jaxnorm's with ``unbiased_running_var=False``. A layer
  with ``axis_name`` pools over its devices, so under ``shard_map``, ``pmap`` or ``vmap`` (and
  across processes) every device gets the statistics of all devices' inputs; under sharded
  ``jit`` without ``axis_name`` the reductions span the shards.

  One jitted step per batch shape (traced once), one pass over the data, O(channels) memory per
  layer. Not for layers inside ``nn.scan`` or ``nn.vmap`` (stacked ``batch_stats``).

  Args:
    model: the Linen module.
    variables: its variables (``params``, ``batch_stats``, ...).
    batches: an iterable of batches, each passed as the first argument of ``model.apply``
      (any pytree, such as ``(x, mask)`` for a model that passes masks to its norms).
    **apply_kwargs: further arguments of ``model.apply`` (``train=True``, ``rngs=...``,
      ``method=...``).

  Returns:
    ``variables`` with each batch-norm layer's ``batch_stats/mean`` and ``/var`` replaced;
    everything else, ``BatchRenorm``'s step included, as given.

  Raises:
    ValueError: no batches; no batch-norm layer ran; a channel with no valid input over all
      batches; ``LpBatchNorm`` with p other than 2.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnn
    >>> model = jnn.BatchNorm(use_running_average=True)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 1)))
    >>> batches = [jnp.array([[1.0], [2.0], [3.0]]), jnp.array([[10.0], [12.0]])]
    >>> new = jnn.recompute_batch_stats(model, variables, batches)
    >>> new["batch_stats"]["mean"], new["batch_stats"]["var"]   # of [1, 2, 3, 10, 12]: unbiased
    (Array([5.6], dtype=float32), Array([25.3], dtype=float32))
  """
  apply_kwargs = dict(apply_kwargs)
  mutable = _mutable(apply_kwargs)
  biased: dict[tuple[str, ...], bool] = {}

  def sow_batch_moments(next_fun, args, kwargs, context):
    """Sows a batch-norm call's input moments, then runs it in training mode."""
    if not freezing.is_linen_batch_norm_call(context) or context.module.is_initializing():
      return next_fun(*args, **kwargs)
    layer = context.module
    biased[tuple(layer.scope.path)] = stores_biased_variance(layer)  # static, at trace time
    arguments = freezing.call_arguments(layer, args, kwargs).arguments
    layer.sow(COLLECTION, "moments", layer_moments(layer, arguments["x"], arguments.get("mask")))
    return freezing.call_in_mode(next_fun, layer, args, kwargs, False)

  def batch_moments(variables, batch):
    with nn.intercept_methods(sow_batch_moments):
      _, state = model.apply(variables, batch, mutable=mutable, **apply_kwargs)
    flat = traverse_util.flatten_dict(core.unfreeze(state.get(COLLECTION, {})))
    return {path[:-1]: merge_all(calls) for path, calls in flat.items()}

  step = jax.jit(batch_moments)
  merge = jax.jit(merge_layers)
  total = None
  for batch in batches:
    moments = step(variables, batch)
    total = moments if total is None else merge(total, moments)
  check_batches(total, model)
  return _replace_stats(variables, {
      path: population_stats(moments, biased[path], "/".join(path))
      for path, moments in total.items()})


def _replace_stats(variables: Mapping[str, Any], stats: Mapping[tuple[str, ...], bn.BatchStats]):
  """``variables`` with ``batch_stats/<path>/mean`` and ``/var`` replaced, in their dtypes."""
  frozen = isinstance(variables, core.FrozenDict)
  result = core.unfreeze(variables) if frozen else dict(variables)
  flat = traverse_util.flatten_dict(core.unfreeze(result.get("batch_stats", {})))
  for path, new in stats.items():
    for name, value in new._asdict().items():
      old = flat[path + (name,)]
      flat[path + (name,)] = jnp.asarray(value, old.dtype)
  result["batch_stats"] = traverse_util.unflatten_dict(flat)
  return core.freeze(result) if frozen else result
