"""The one place where jaxnorm gathers values across devices, and merges moments after.

Each device reduces its own valid elements to ``(count, shift, residual, var)``
(:class:`jaxnorm._src.moments.Moments`); one gather brings every device's to all of them, and
:func:`merge_moments` combines them weighted by count: the result is exactly the statistics of
all valid elements together, and a device with no valid element (count 0) contributes nothing.

:func:`gather` brings every device's ``stacked`` statistics to all of them, for any axis name
that JAX maps over: a single name, or a tuple of names bound by any mix of ``vmap``, ``pmap``
and ``shard_map``. ``lax.all_gather`` over a tuple fails inside JAX when one of the names is a
``vmap`` axis (``AssertionError: axis size doesn't match``); there the names are gathered one
map at a time, which is the same result.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax

from jaxnorm._src import checks

AxisName = Hashable
Groups = Sequence[Sequence[int]] | None

_GATHER_CAN_BE_INVARIANT = "to" in inspect.signature(lax.all_gather).parameters


def gather(stacked: Array, axis_name: AxisName, axis_index_groups: Groups = None) -> Array:
  """Every device's ``stacked``, along a new leading axis, on every device.

  Entry ``i`` of the leading axis is the device whose index over ``axis_name`` is ``i``
  (row-major over a tuple of names, as ``lax.axis_index(axis_name)`` counts); its size is the
  number of devices over all the names, or the group size with ``axis_index_groups``.

  How the names are gathered, and the collectives in the compiled program:

  * one name (or a 1-tuple), or a tuple of ``shard_map`` mesh axes (and of ``pmap`` axes where
    ``pmap`` runs as ``shard_map``, as in JAX 0.10): one ``lax.all_gather``, one all-gather.
  * a tuple that names a ``vmap`` axis, e.g. ``('a', 'b')`` under
    ``vmap(vmap(f, axis_name='b'), axis_name='a')`` or ``pmap(vmap(f, axis_name='b'),
    axis_name='a')``, where one ``lax.all_gather`` fails inside JAX: one ``lax.all_gather`` per
    ``vmap`` name and one per run of consecutive mesh names, the last names first, then the
    leading axes flattened into one. A ``vmap`` gather compiles to no collective, so this is
    no all-gather under nested ``vmap`` and one under ``pmap(vmap)`` or for ``('x', 'y', 'v')``
    with a ``vmap`` over ``'v'`` inside a ``shard_map`` over ``'x'`` and ``'y'``. (Where JAX does
    not list the mesh axes in scope, older JAX, each name is gathered alone: the same result,
    one all-gather per ``pmap`` or ``shard_map`` name.)

  Inside ``jax.shard_map`` with ``check_vma=True`` each gather over names that ``stacked``
  varies over is the invariant one (``to="invarying"``): its result counts as the same on
  every device, so pooled statistics can leave with ``out_specs=P()`` or be stored as
  replicated running statistics, and its transpose is the matching slice of the cotangent.
  Elsewhere the plain gather, whose transpose sums every device's cotangent.

  ``axis_index_groups`` (indices into the flattened tuple) goes to one plain
  ``lax.all_gather``, where JAX supports it (``pmap``; not ``vmap``, which raises an error
  saying what to do instead).
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if axis_index_groups is not None:
    try:
      return _gather_once(stacked, names, axis_index_groups)
    except NotImplementedError as error:
      raise NotImplementedError(
          f"axis_index_groups cannot be used with axis_name={axis_name!r} here: JAX's vmap "
          "has no axis_index_groups. Map each group as an axis of its own instead (vmap over "
          "(groups, group_size) and pool over the inner name only), or pool under pmap."
      ) from error
  mesh_axes = _manual_mesh_axes()
  runs = []  # the names gathered together: consecutive mesh names; each vmap name alone
  for name in names:
    if runs and name in mesh_axes and runs[-1][-1] in mesh_axes:
      runs[-1] += (name,)
    else:
      runs.append((name,))
  gathered = stacked
  for run in reversed(runs):
    gathered = _gather_once(gathered, run, None)
  devices = math.prod(gathered.shape[:len(runs)])
  return gathered.reshape((devices,) + tuple(stacked.shape))


def _manual_mesh_axes() -> frozenset:
  """Names of the mesh axes in scope that collectives run over (``shard_map``'s, and ``pmap``'s
  where it runs as ``shard_map``); empty where this JAX does not say."""
  get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get_abstract_mesh() if get_abstract_mesh is not None else None
  return frozenset(getattr(mesh, "manual_axes", None) or ())


def _gather_once(stacked: Array, names: tuple, axis_index_groups: Groups) -> Array:
  """One ``lax.all_gather`` over ``names``, invariant where ``shard_map`` tracks variance."""
  axis_name = names[0] if len(names) == 1 else names
  aval = jax.typeof(stacked) if hasattr(jax, "typeof") else None
  varying = getattr(aval, "vma", None) or getattr(getattr(aval, "mat", None), "varying", ())
  if _GATHER_CAN_BE_INVARIANT and axis_index_groups is None and set(names) <= set(varying):
    return lax.all_gather(stacked, axis_name, to="invarying")
  return lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)


def psum(stacked: Array, axis_name: AxisName, axis_index_groups: Groups = None) -> Array:
  """``lax.psum`` over the devices of ``axis_name``."""
  return lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups)


def merge_moments(parts):
  """Merges moments stacked along a leading axis (one entry per part) into those of all parts.

  Chan's parallel formulas, weighted by count, in the frame of the first part that has a valid
  element:

  .. math::

     n = \\sum_d n_d, \\quad \\mu = \\frac{1}{n}\\sum_d n_d \\mu_d, \\quad
     \\sigma^2 = \\frac{1}{n}\\sum_d n_d\\big(\\sigma_d^2 + (\\mu_d - \\mu)^2\\big).
  """
  counts, shifts, residuals, variances = parts
  reference = jnp.argmax(counts > 0, axis=0)[None]
  shift = lax.stop_gradient(jnp.take_along_axis(shifts, reference, axis=0)[0])
  part_means = (shifts - shift) + residuals
  count = jnp.sum(counts, axis=0)
  safe_count = jnp.where(count > 0, count, 1)
  residual = jnp.sum(counts * part_means, axis=0) / safe_count
  spread = counts * (variances + checks.abs_square(part_means - residual))
  return type(parts)(count, shift, residual, jnp.sum(spread, axis=0) / safe_count)


def pool_moments(moments, axis_name: AxisName, axis_index_groups: Groups = None):
  """Every device's moments merged into those of all their elements, with one all_gather.

  Complex moments (complex shift and residual) travel as their real and imaginary parts.
  """
  count, shift, residual, var = moments
  if not jnp.iscomplexobj(shift):
    gathered = gather(jnp.stack(moments), axis_name, axis_index_groups)
    return merge_moments(type(moments)(*(gathered[:, i] for i in range(4))))
  parts = (count, shift.real, shift.imag, residual.real, residual.imag, var)
  gathered = gather(jnp.stack(parts), axis_name, axis_index_groups)
  count, shift_re, shift_im, residual_re, residual_im, var = (gathered[:, i] for i in range(6))
  return merge_moments(type(moments)(count, lax.complex(shift_re, shift_im),
                                     lax.complex(residual_re, residual_im), var))


def explicit_shards(x: Array, axes: tuple[int, ...]):
  """The mesh, x's partition entries, and the Explicit mesh axes that shard the ``axes`` of x.

  Only sharding in types (an Explicit mesh, ``jax.make_mesh``'s default) is visible while
  tracing; under an Auto mesh this finds nothing and XLA partitions the reductions itself.
  """
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  if explicit is None or not hasattr(jax, "typeof"):  # JAX without sharding in types
    return None
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  entries = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  names = []
  for axis in axes:
    entry = entries[axis]
    for name in () if entry is None else entry if isinstance(entry, tuple) else (entry,):
      if types.get(name) == explicit:
        names.append(name)
  return (mesh, entries, tuple(names)) if names else None


def pool_explicit_shards(local: Callable[[Array, Array | None], Any], x: Array,
                         axes: tuple[int, ...], where: Array | None, shards):
  """``local(shard, mask_shard)`` on each shard, pooled over the mesh axes that shard ``axes``.

  One all_gather, as with ``axis_name``; ``shards`` from :func:`explicit_shards`.
  """
  mesh, entries, names = shards
  spec = jax.sharding.PartitionSpec
  out_spec = spec(*(None if a in axes else entry for a, entry in enumerate(entries)))

  def pooled(x_shard, *where_shard):
    return pool_moments(local(x_shard, where_shard[0] if where_shard else None), names)

  if where is None:
    return jax.shard_map(pooled, mesh=mesh, in_specs=(spec(*entries),), out_specs=out_spec)(x)
  where_spec = spec(*(None if where.shape[a] == 1 else entry for a, entry in enumerate(entries)))
  where = jax.sharding.reshard(where, jax.sharding.NamedSharding(mesh, where_spec))
  return jax.shard_map(pooled, mesh=mesh, in_specs=(spec(*entries), where_spec),
                       out_specs=out_spec)(x, where)
