"""Exact population statistics of every batch-norm layer (PreciseBN), for NNX models, in place.

The same statistics as :mod:`jaxnorm._src.population` (each layer's moments merged by count
over all batches), found without method interception, which NNX lacks: for the pass, each
batch-norm layer's class is swapped for a subclass whose ``__call__`` records the moments of
its valid inputs and runs it in training mode; the classes are restored after, whatever
happens.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from flax import nnx

from jaxnorm._src import freezing
from jaxnorm._src import population

_ACTIVE = threading.local()  # .layers: {id(layer): path}, .moments: {path: [Moments]}
_RECORDING: dict[type, type] = {}


def recording_class(cls: type) -> type:
  """The subclass of ``cls`` that records its inputs' moments (one per class, cached).

  Its ``__call__`` records the moments of the layer's valid inputs, then runs ``cls``'s in
  training mode; it has ``cls.__call__``'s signature (``functools.wraps``).
  """
  if cls not in _RECORDING:
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
      arguments = freezing.call_arguments(self, args, kwargs).arguments
      _ACTIVE.moments.setdefault(_ACTIVE.layers[id(self)], []).append(
          population.layer_moments(self, arguments["x"], arguments.get("mask")))
      return freezing.call_in_mode(functools.partial(original, self), self, args, kwargs, False)

    # The original's name, so that the layer's own errors read as usual.
    _RECORDING[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                                  "__qualname__": cls.__qualname__})
  return _RECORDING[cls]


@contextlib.contextmanager
def recording(model: nnx.Module) -> Iterator[dict[tuple, Any]]:
  """Swaps every batch-norm layer of ``model`` to its recording class; yields them by path."""
  layers = {tuple(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, freezing.NNX_BATCH_NORMS)}
  try:
    for layer in layers.values():
      object.__setattr__(layer, "__class__", recording_class(type(layer)))
    yield layers
  finally:
    for layer in layers.values():
      if type(layer) in _RECORDING.values():
        object.__setattr__(layer, "__class__", type(layer).__mro__[1])


def recompute_batch_stats(model: nnx.Module, batches: Iterable[Any], **call_kwargs) -> None:
  """Sets every batch-norm layer's ``mean`` and ``var`` to its exact population values, in place.

  Calls ``model(batch, **call_kwargs)`` on each batch with every batch-norm layer in training
  mode (whatever its ``use_running_average``) and merges each layer's moments of its valid
  inputs by count, as :func:`jaxnorm.linen.recompute_batch_stats`:

  .. math::

     \\mu = \\frac{1}{n}\\sum_b n_b \\mu_b, \\qquad
     \\sigma^2 = \\frac{1}{n}\\sum_b n_b\\big(\\sigma_b^2 + (\\mu_b - \\mu)^2\\big)

  Layers: jaxnorm's ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``LpBatchNorm`` (p=2)
  and ``ConditionalBatchNorm``, and ``flax.nnx.BatchNorm``, anywhere in the graph. jaxnorm's
  store the unbiased variance (the biased one with ``unbiased_running_var=False``), flax's the
  biased one, as each does in training. Nothing else
  changes: the pass runs on a copy of the state in one jitted step per batch shape (traced
  once), so the layers' moving averages, ``BatchRenorm``'s step and RNG counters are left as
  they were, and only ``mean`` and ``var`` are written at the end.

  Args:
    model: the NNX module, changed in place.
    batches: an iterable of batches, each the first argument of ``model``.
    **call_kwargs: further arguments of ``model(...)``.

  Raises:
    ValueError: no batches; no batch-norm layer ran; a channel with no valid input over all
      batches; ``LpBatchNorm`` with p other than 2.

  Example:
    >>> import jax.numpy as jnp, jaxnorm.nnx as jnnx
    >>> layer = jnnx.BatchNorm(1, use_running_average=True)
    >>> batches = [jnp.array([[1.0], [2.0], [3.0]]), jnp.array([[10.0], [12.0]])]
    >>> jnnx.recompute_batch_stats(layer, batches)
    >>> layer.mean[...], layer.var[...]                   # of [1, 2, 3, 10, 12]: unbiased
    (Array([5.6], dtype=float32), Array([25.3], dtype=float32))
  """
  with recording(model) as layers:
    graphdef, state = nnx.split(model)

    def batch_moments(state, batch):
      copy = nnx.merge(graphdef, state)
      _ACTIVE.layers = {id(node): tuple(path) for path, node in nnx.iter_graph(copy)
                        if type(node) in _RECORDING.values()}
      _ACTIVE.moments = {}
      try:
        copy(batch, **call_kwargs)
        return {path: population.merge_all(calls) for path, calls in _ACTIVE.moments.items()}
      finally:
        del _ACTIVE.layers, _ACTIVE.moments

    step = jax.jit(batch_moments)
    merge = jax.jit(population.merge_layers)
    total = None
    for batch in batches:
      moments = step(state, batch)
      total = moments if total is None else merge(total, moments)
  population.check_batches(total, model)
  stats = {path: population.population_stats(
      moments, population.stores_biased_variance(layers[path]), "/".join(map(str, path)))
           for path, moments in total.items()}
  for path, new in stats.items():
    layer = layers[path]
    layer.mean.value = new.mean.astype(layer.mean.value.dtype)
    layer.var.value = new.var.astype(layer.var.value.dtype)
