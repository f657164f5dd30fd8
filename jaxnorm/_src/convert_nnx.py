"""Running a Flax NNX model you did not write on jaxnorm's norms: :func:`convert`.

Every ``flax.nnx`` ``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm``
in a model is replaced in place by jaxnorm's NNX layer of the same name, with the same
arguments and the very same ``nnx.Param`` and ``nnx.BatchStat`` objects: the state tree, and
so checkpoints and optimizer states, do not change.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes

from jaxnorm._src import nnx_batch_norms
from jaxnorm._src import nnx_norms

COMMON = ("epsilon", "dtype", "param_dtype", "use_scale", "axis_name", "axis_index_groups",
          "use_fast_variance")
# flax's layer -> (jaxnorm's layer, the attributes passed on as constructor arguments).
TARGETS = {
    nnx.BatchNorm: (nnx_batch_norms.BatchNorm, COMMON + (
        "num_features", "use_running_average", "axis", "momentum", "use_bias")),
    nnx.LayerNorm: (nnx_norms.LayerNorm, COMMON + (
        "num_features", "use_bias", "reduction_axes", "feature_axes")),
    nnx.RMSNorm: (nnx_norms.RMSNorm, COMMON + ("num_features", "reduction_axes",
                                               "feature_axes")),
    nnx.GroupNorm: (nnx_norms.GroupNorm, COMMON + ("num_groups", "use_bias", "reduction_axes")),
    nnx.InstanceNorm: (nnx_norms.InstanceNorm, COMMON + ("num_features", "use_bias",
                                                         "feature_axes")),
}
VARIABLES = ("scale", "bias", "mean", "var")
# Attributes with the one value jaxnorm honours (its layers' behaviour for any other).
FIXED = {"promote_dtype": dtypes.promote_dtype, "feature_axis": -1}


def _flax_class(node: Any) -> type | None:
  """The flax norm whose call ``node`` runs unchanged (itself, or a subclass that does not
  override ``__call__``), or None."""
  for flax_class in TARGETS:
    if isinstance(node, flax_class) and type(node).__call__ is flax_class.__call__:
      return flax_class
  return None


def _children(node: Any):
  """``(key, child)`` of every attribute or item of a graph node that may hold a module."""
  if isinstance(node, (list, tuple)):
    return list(enumerate(node))
  if isinstance(node, Mapping):
    return list(node.items())
  if isinstance(node, nnx.Pytree):
    children = dict(nnx.iter_children(node))
    for name, child in vars(node).items():  # plain containers that iter_children skips
      if name not in children and isinstance(child, (list, tuple, Mapping)):
        children[name] = child
    return list(children.items())
  return []


def _occurrences(model: Any) -> list[tuple[Any, Any, Any]]:
  """``(parent, key, norm)`` for every reference to a flax norm in ``model`` (a shared one at
  each place it is held)."""
  found, seen = [], set()

  def walk(node):
    if id(node) in seen:
      return
    seen.add(id(node))
    for key, child in _children(node):
      if _flax_class(child) is not None:
        found.append((node, key, child))
      else:
        walk(child)

  walk(model)
  return found


def _where(norm: Any) -> str:
  return type(norm).__name__


def replacement(norm: Any) -> nnx.Module:
  """jaxnorm's layer for one flax norm, holding the same variables; raises if an option of the
  flax layer has no equivalent in jaxnorm's."""
  flax_class = _flax_class(norm)
  target, passed = TARGETS[flax_class]
  attributes = {name: value for name, value in vars(norm).items()
                if not name.startswith("_pytree__")}
  for name, value in attributes.items():
    if name in FIXED:
      if value is not FIXED[name] and value != FIXED[name]:
        raise NotImplementedError(
            f"{_where(norm)} has {name}={value!r}, which jaxnorm's {target.__name__} cannot "
            f"honour (it supports only {name}={FIXED[name]!r}); leave this layer unconverted "
            f"by not calling jaxnorm.nnx.convert, or build it with the default {name}")
    elif name not in passed and name not in VARIABLES and name not in ("num_features",
                                                                       "group_size"):
      raise NotImplementedError(
          f"{_where(norm)} has the attribute {name}={value!r}, which jaxnorm's "
          f"{target.__name__} does not know; convert only layers built with flax.nnx's own "
          f"arguments")
  kwargs = {name: attributes[name] for name in passed if name in attributes}
  if flax_class is nnx.GroupNorm:
    kwargs["num_features"] = attributes["num_groups"] * attributes["group_size"]
  if flax_class is nnx.BatchNorm:
    kwargs["unbiased_running_var"] = False  # Flax's rule: statistics evolve as they did
  new = target(**kwargs)
  for name in VARIABLES:
    old_variable = attributes.get(name)
    if isinstance(old_variable, nnx.Variable):
      setattr(new, name, old_variable)
  return new


def _replace(parent: Any, key: Any, new: Any) -> None:
  if isinstance(parent, (list, Mapping, nnx.List, nnx.Dict)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def convert(model: Any) -> Any:
  """Replaces flax.nnx's norm layers in ``model`` with jaxnorm's, in place, and returns it.

  ``nnx.BatchNorm``, ``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.GroupNorm`` and
  ``nnx.InstanceNorm`` (and subclasses that do not override ``__call__``), at any depth, in
  attributes, ``nnx.List``, ``nnx.Dict`` or plain lists and dicts, become
  :class:`jaxnorm.nnx.BatchNorm`, ... built with the same arguments and holding the same
  ``nnx.Param`` / ``nnx.BatchStat`` objects; a layer held in two places stays one layer. Batch
  norms get ``unbiased_running_var=False`` (Flax's biased running variance), so near zero the
  converted model computes and trains as before, and far from zero it stays right. Every layer
  is checked before any is replaced: on error nothing has changed.

  Args:
    model: an ``nnx.Module`` (or a flax norm itself).

  Returns:
    ``model``, converted (for a flax norm given directly, the new jaxnorm layer).

  Raises:
    NotImplementedError: a layer sets an option jaxnorm cannot honour (a custom
      ``promote_dtype``, a GroupNorm ``feature_axis`` other than -1), or one it does not know.
    ValueError: a norm held in a tuple, which cannot be replaced in place, or no flax norm.

  Example:
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> model = jnnx.convert(model)
    >>> type(model.layers[1]).__module__, model.layers[1].unbiased_running_var
    ('jaxnorm._src.nnx_batch_norms', False)
  """
  if _flax_class(model) is not None:
    return replacement(model)
  occurrences = _occurrences(model)
  if not occurrences:
    raise ValueError(
        f"no flax.nnx norm layer (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm) found "
        f"in the {type(model).__name__}; pass the model that holds them (subclasses that "
        f"override __call__ and layers already converted are left alone)")
  new_layers: dict[int, nnx.Module] = {}
  for parent, key, norm in occurrences:  # every check and build first: all or nothing
    if isinstance(parent, tuple):
      raise ValueError(f"a {_where(norm)} is held in a tuple (at index {key}), which cannot "
                       f"be changed in place; hold the layers in a list or nnx.List")
    if id(norm) not in new_layers:
      new_layers[id(norm)] = replacement(norm)
  for parent, key, norm in occurrences:
    _replace(parent, key, new_layers[id(norm)])
  return model
