"""Folding batch norms into the layers next to them, in Flax models: a Linen variables tree
(:func:`fold_batch_norms`, :func:`fold_preceding_batch_norms`) and NNX layers
(:func:`fold_into_layer`, :func:`fold_into_next_layer`), each applying the array folds of
:mod:`jaxnorm._src.folding` to the kernel, bias and statistics it finds.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from jaxnorm._src.folding import fold_batch_norm
from jaxnorm._src.folding import fold_preceding_batch_norm

Path = str | Sequence[str]


# Linen variables trees.


def _path(path: Path) -> tuple[str, ...]:
  return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def _get(tree: Mapping[str, Any], collection: str, path: tuple[str, ...], what: str):
  node = tree.get(collection, {})
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      where = "/".join(path[:i]) or "the top level"
      keys = sorted(node) if isinstance(node, Mapping) else []
      raise KeyError(f"{what} {'/'.join(path)!r} is not in variables[{collection!r}]: no "
                     f"{key!r} under {where} (found {keys}); give module paths as "
                     f"'block1/conv1' or ('block1', 'conv1'), as in the variables tree")
    node = node[key]
  return node


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _set(tree: dict, collection: str, path: tuple[str, ...], value) -> None:
  node = tree.setdefault(collection, {})
  for key in path[:-1]:
    node = node[key]
  if value is None:
    node.pop(path[-1], None)
  else:
    node[path[-1]] = value


def _drop_norm(tree: dict, path: tuple[str, ...]) -> None:
  for collection in list(tree):
    node = tree[collection]
    for key in path[:-1]:
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if isinstance(node, dict):
      node.pop(path[-1], None)


def _fold_tree(variables, pairs, epsilon: float, preceding: bool, padding) -> dict[str, Any]:
  pairs = list(pairs)
  if not pairs:
    raise ValueError("no (layer, norm) pairs given; pass e.g. [('conv1', 'bn1')], the paths of "
                     "each layer and the batch norm next to it in the variables tree")
  folded = []  # every fold is computed before the tree changes: all or nothing
  for first, second in pairs:
    layer, norm = (_path(second), _path(first)) if preceding else (_path(first), _path(second))
    layer_params = _get(variables, "params", layer, "layer")
    stats = _get(variables, "batch_stats", norm, "batch norm")
    norm_params = _find(variables, "params", norm) or {}  # no params: scale 1, bias 0
    if "kernel" not in layer_params:
      raise ValueError(f"layer {'/'.join(layer)!r} has no 'kernel' (found "
                       f"{sorted(layer_params)}); pass a Dense or Conv layer's path")
    if "mean" not in stats or "var" not in stats:
      raise ValueError(f"{'/'.join(norm)!r} has no batch_stats mean and var (found "
                       f"{sorted(stats)}); pass a batch norm's path")
    fold = fold_preceding_batch_norm if preceding else fold_batch_norm
    options = {"padding": padding} if preceding else {}
    try:
      result = fold(layer_params["kernel"], layer_params.get("bias"), stats["mean"],
                    stats["var"], scale=norm_params.get("scale"),
                    bn_bias=norm_params.get("bias"), epsilon=epsilon, **options)
    except ValueError as error:
      raise ValueError(f"folding {'/'.join(norm)!r} into {'/'.join(layer)!r}: {error}") from None
    folded.append((layer, norm, layer_params, result))
  tree = _to_dict(variables)
  for layer, norm, layer_params, (kernel, bias) in folded:
    _set(tree, "params", layer, {**layer_params, "kernel": kernel, "bias": bias})
    _drop_norm(tree, norm)
  return {name: collection for name, collection in tree.items() if collection}


def _find(tree: Mapping[str, Any], collection: str, path: tuple[str, ...]):
  node = tree.get(collection, {})
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node


def fold_batch_norms(variables: Mapping[str, Any], pairs: Sequence[tuple[Path, Path]], *,
                     epsilon: float = 1e-5) -> dict[str, Any]:
  """Folds each batch norm of a Linen variables tree into the Dense or Conv before it.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of the trained model.
    pairs: ``(layer_path, norm_path)`` for each norm that follows a layer directly, as
      ``"stage1/conv1"`` or ``("stage1", "conv1")``. The norms must normalize the last axis
      (flax's default ``axis=-1``), which the tree cannot show: check the model.
    epsilon: the norms' epsilon.

  Returns:
    A new variables tree (plain dicts) for the model without those norms: each layer holds the
    folded ``kernel`` and a ``bias``, and the norms' ``params`` and ``batch_stats`` are gone.
    Run it with the same model built with ``use_bias=True`` on those layers and the norms
    removed. The given tree is not changed, and nothing is folded if any pair fails.

  Example:
    >>> import numpy as np, jaxnorm.linen as jnn
    >>> variables = {"params": {"conv": {"kernel": np.ones((2, 1), np.float32)}},
    ...              "batch_stats": {"bn": {"mean": np.ones(1), "var": np.full(1, 4.0)}}}
    >>> folded = jnn.fold_batch_norms(variables, [("conv", "bn")], epsilon=0.0)
    >>> folded["params"]["conv"]["bias"], "batch_stats" in folded
    (Array([-0.5], dtype=float32), False)
  """
  return _fold_tree(variables, pairs, epsilon, preceding=False, padding=None)


def fold_preceding_batch_norms(variables: Mapping[str, Any], pairs: Sequence[tuple[Path, Path]],
                               *, epsilon: float = 1e-5, padding: Any = "VALID"
                               ) -> dict[str, Any]:
  """Folds each batch norm of a Linen variables tree into the Dense or Conv *after* it.

  As :func:`fold_batch_norms` with ``pairs`` of ``(norm_path, layer_path)`` and the padding
  rule of :func:`jaxnorm.fold_preceding_batch_norm` (``padding`` is the layers' padding).
  """
  return _fold_tree(variables, pairs, epsilon, preceding=True, padding=padding)


# NNX modules.


def _norm_parts(norm) -> tuple[Any, ...]:
  """``(mean, var, scale, bias, epsilon, axis)`` of a flax or jaxnorm NNX batch norm."""
  for name in ("mean", "var"):
    if not isinstance(getattr(norm, name, None), nnx.Variable):
      raise TypeError(f"{type(norm).__name__} has no running {name}; pass a batch norm "
                      f"(flax.nnx.BatchNorm or jaxnorm.nnx.BatchNorm)")

  def value(name):
    variable = getattr(norm, name, None)
    return variable[...] if isinstance(variable, nnx.Variable) else None

  axis = getattr(norm, "axis", -1)
  return (value("mean"), value("var"), value("scale"), value("bias"), norm.epsilon,
          axis if isinstance(axis, int) else tuple(axis))


def _folded_layer(layer, kernel, bias):
  """A copy of ``layer`` (``nnx.Linear`` or ``nnx.Conv``) with the new kernel and a bias."""
  if not isinstance(getattr(layer, "kernel", None), nnx.Variable):
    raise TypeError(f"{type(layer).__name__} has no kernel; pass an nnx.Linear or nnx.Conv")
  new = copy.deepcopy(layer)
  if getattr(new, "mask", None) is not None:
    kernel = kernel * new.mask  # the mask is folded in; the new layer needs none
    new.mask = None
  new.kernel = type(layer.kernel)(kernel)
  new.bias = nnx.Param(bias.astype(layer.param_dtype))
  new.use_bias = True
  return new


def fold_into_layer(layer, norm):
  """A new ``nnx.Linear`` / ``nnx.Conv``: ``layer`` followed by the batch norm ``norm``, folded.

  ``norm`` is a ``flax.nnx.BatchNorm`` or ``jaxnorm.nnx.BatchNorm`` (its running statistics,
  scale, bias and epsilon are used, as in evaluation; its axis must be the last). ``layer`` is
  left unchanged; the result has ``use_bias=True`` (see :func:`jaxnorm.fold_batch_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> conv, norm = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> folded = jnnx.fold_into_layer(conv, norm)
    >>> x = jnp.ones((1, 5, 5, 2))
    >>> bool(jnp.allclose(folded(x), norm(conv(x), use_running_average=True), atol=1e-5))
    True
  """
  mean, var, scale, bias, epsilon, axis = _norm_parts(norm)
  if not isinstance(axis, int):
    raise ValueError(f"the norm's axis={axis} is not the layer's output axis; fold only norms "
                     f"with axis=-1")
  layer_bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
  kernel, new_bias = fold_batch_norm(layer.kernel[...], layer_bias, mean, var, scale=scale,
                                     bn_bias=bias, epsilon=epsilon, axis=axis)
  return _folded_layer(layer, kernel, new_bias)


def fold_into_next_layer(norm, layer):
  """A new ``nnx.Linear`` / ``nnx.Conv``: the batch norm ``norm`` followed by ``layer``, folded.

  The padding rule of :func:`jaxnorm.fold_preceding_batch_norm` applies (a 'SAME' conv
  raises). A masked conv has its mask folded into the new kernel.
  """
  mean, var, scale, bias, epsilon, axis = _norm_parts(norm)
  if not isinstance(axis, int):
    raise ValueError(f"the norm's axis={axis} is not the layer's input axis; fold only norms "
                     f"with axis=-1")
  kernel = layer.kernel[...]
  if getattr(layer, "mask", None) is not None:
    kernel = kernel * layer.mask
  layer_bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
  new_kernel, new_bias = fold_preceding_batch_norm(
      kernel, layer_bias, mean, var, scale=scale, bn_bias=bias, epsilon=epsilon,
      padding=getattr(layer, "padding", None), axis=axis)
  return _folded_layer(layer, new_kernel, new_bias)
