"""collectives.gather: every device's statistics on every device, for any axis-name form.

Per-lane moments (count, shift, mean, var) are gathered with :func:`collectives.gather` and
merged by count (Chan's formulas); under ``vmap(vmap)``, ``pmap(vmap)`` and ``shard_map`` over a
2x4 mesh with a tuple of names, and with a single name, they must equal the float64 NumPy
moments of all valid elements, lanes without a valid element included, with exact gradients
and the expected number of collectives in the compiled program.
"""
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jaxnorm._src import collectives

A, B = 2, 4  # outer and inner map sizes: 8 lanes (devices)
ROWS, C = 4, 3
VALID_ROWS = np.array([[4, 1, 1, 0], [2, 3, 0, 4]])  # per lane: unequal, two lanes empty
TUPLE = ("a", "b")


def local_merge(parts):
  """Chan's count-weighted merge of moments stacked along axis 0, in the frame of the first part
  with a valid element (a part with count 0 contributes nothing)."""
  counts, shifts, means, variances = parts
  reference = jnp.argmax(counts > 0, axis=0)[None]
  shift = lax.stop_gradient(jnp.take_along_axis(shifts, reference, axis=0)[0])
  part_means = (shifts - shift) + means
  count = jnp.sum(counts, axis=0)
  safe = jnp.where(count > 0, count, 1)
  mean = jnp.sum(counts * part_means, axis=0) / safe
  var = jnp.sum(counts * (variances + jnp.square(part_means - mean)), axis=0) / safe
  return count, shift, mean, var


class Parts(NamedTuple):
  count: jax.Array
  shift: jax.Array
  mean: jax.Array
  var: jax.Array


MERGES = {"local": local_merge,
          "library": lambda parts: tuple(collectives.merge_moments(Parts(*parts)))}


def lane_moments(x, w):
  """This lane's (count, shift, mean - shift, var) over rows; shift = its valid mean, 0 if none."""
  w = jnp.broadcast_to(w, x.shape)
  count = jnp.sum(w, axis=0, dtype=x.dtype)
  safe = jnp.where(count > 0, count, 1)
  shift = lax.stop_gradient(jnp.sum(jnp.where(w, x, 0), axis=0) / safe)
  centred = jnp.where(w, x - shift, 0)
  mean = jnp.sum(centred, axis=0) / safe
  var = jnp.sum(centred * centred, axis=0) / safe - mean * mean
  return count, shift, mean, var


def pooled(x, w, axis_name, merge=local_merge, axis_index_groups=None):
  """(mean, var) of every lane's valid rows, via one gather of the stacked lane moments."""
  gathered = collectives.gather(jnp.stack(lane_moments(x, w)), axis_name, axis_index_groups)
  _, shift, mean, var = merge(tuple(gathered[:, i] for i in range(4)))
  return jnp.stack([shift + mean, var])


def batch(seed=0, offset=1e3):
  """x of shape (A, B, ROWS, C) in float64, and a row mask with VALID_ROWS valid rows per lane."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((A, B, ROWS, C)) * 2 + offset
  where = np.arange(ROWS)[None, None, :, None] < VALID_ROWS[:, :, None, None]
  x = np.where(where, x, rng.standard_normal(x.shape) * 1e4)  # padding far from the data
  return x, where


def expected(x, where):
  valid = np.broadcast_to(where, x.shape).reshape(-1, C)
  rows = x.reshape(-1, C)
  mean = np.array([rows[valid[:, c], c].mean() for c in range(C)])
  var = np.array([rows[valid[:, c], c].var() for c in range(C)])
  return np.stack([mean, var])


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def needs_devices(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (conftest.py sets 8 host devices)")


def mesh_2x4():
  return Mesh(np.array(jax.devices()[:A * B]).reshape(A, B), TUPLE)


def over_two_names(fn, mode, *, check_vma=True):
  """fn(lane x, lane w) mapped over the leading (A, B) axes, with names 'a' (outer), 'b'."""
  if mode == "vmap":
    return jax.vmap(jax.vmap(fn, axis_name="b"), axis_name="a")
  if mode == "pmap":
    return jax.pmap(jax.vmap(fn, axis_name="b"), axis_name="a", devices=jax.devices()[:A])

  def local(x, w):
    return fn(x[0, 0], w[0, 0])[None, None]

  return jax.jit(jax.shard_map(local, mesh=mesh_2x4(), in_specs=P(*TUPLE),
                               out_specs=P(*TUPLE), check_vma=check_vma))


MODES = ["vmap", "pmap", "shard_map"]


def setup_mode(mode):
  if mode != "vmap":
    needs_devices(A * B)


# --- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("merge", sorted(MERGES))
@pytest.mark.parametrize("mode", MODES)
def test_tuple_axis_name_pools_every_lane(mode, merge):
  setup_mode(mode)
  x, where = batch()
  out = over_two_names(lambda x, w: pooled(x, w, TUPLE, MERGES[merge]), mode)(x, where)
  assert out.shape == (A, B, 2, C)
  ref = expected(x, where)
  for a in range(A):
    for b in range(B):  # every lane, the empty ones too, sees the same statistics
      np.testing.assert_allclose(out[a, b], ref, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis_name", [("a", "b"), ("b", "a")])
def test_gathered_order_is_axis_index_order(mode, axis_name):
  """Entry i of the gather is the lane whose lax.axis_index(axis_name) is i."""
  setup_mode(mode)
  x, where = batch()

  def fn(x, w):
    index = lax.axis_index(axis_name) + 0 * w[0, 0]
    return collectives.gather(index.astype(x.dtype), axis_name)

  out = over_two_names(fn, mode)(x, where)
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(A * B), (A, B, A * B)))


def test_shard_map_tuple_gather_is_invariant():
  """With check_vma, the pooled statistics may leave the shard_map as replicated (P())."""
  needs_devices(A * B)
  x, where = batch()
  fn = jax.jit(jax.shard_map(lambda x, w: pooled(x[0, 0], w[0, 0], TUPLE), mesh=mesh_2x4(),
                             in_specs=P(*TUPLE), out_specs=P()))
  np.testing.assert_allclose(fn(x, where), expected(x, where), rtol=1e-12)


def test_shard_map_tuple_without_check_vma():
  needs_devices(A * B)
  x, where = batch()
  out = over_two_names(lambda x, w: pooled(x, w, TUPLE), "shard_map", check_vma=False)(x, where)
  np.testing.assert_allclose(out, np.broadcast_to(expected(x, where), out.shape), rtol=1e-12)


def test_mesh_and_vmap_names_in_one_tuple():
  """('a', 'b', 'v'): a 2x4 shard_map and a vmap inside it. JAX 0.10 rejects any collective over
  a vmap axis inside shard_map with check_vma=True (psum too), so check_vma=False here."""
  needs_devices(A * B)
  x, where = batch()
  x, where = x.reshape(A, B, 2, ROWS // 2, C), where.reshape(A, B, 2, ROWS // 2, 1)

  def local(x, w):
    inner = jax.vmap(lambda x, w: pooled(x, w, TUPLE + ("v",)), axis_name="v")
    return inner(x[0, 0], w[0, 0])[None, None]

  fn = jax.jit(jax.shard_map(local, mesh=mesh_2x4(), in_specs=P(*TUPLE), out_specs=P(*TUPLE),
                             check_vma=False))
  out = fn(x, where)
  assert out.shape == (A, B, 2, 2, C)
  np.testing.assert_allclose(out, np.broadcast_to(expected(x, where), out.shape), rtol=1e-12)


# --- a single name -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis_name", ["d", ("d",)])
def test_single_name(mode, axis_name):
  setup_mode(mode)
  x, where = batch()
  x, where = x.reshape(A * B, ROWS, C), where.reshape(A * B, ROWS, 1)
  fn = lambda x, w: pooled(x, w, axis_name)
  if mode == "vmap":
    mapped = jax.vmap(fn, axis_name="d")
  elif mode == "pmap":
    mapped = jax.pmap(fn, axis_name="d", devices=jax.devices()[:A * B])
  else:
    mesh = Mesh(np.array(jax.devices()[:A * B]), ("d",))
    mapped = jax.jit(jax.shard_map(lambda x, w: fn(x[0], w[0])[None], mesh=mesh,
                                   in_specs=P("d"), out_specs=P("d")))
  out = mapped(x, where)
  np.testing.assert_allclose(out, np.broadcast_to(expected(x, where), out.shape), rtol=1e-12)


def test_axis_index_groups_under_pmap_pool_within_groups():
  needs_devices(4)
  x = np.arange(8.0).reshape(4, 2, 1)  # lane d holds 2d, 2d + 1
  w = np.ones((4, 2, 1), bool)
  out = jax.pmap(lambda x, w: pooled(x, w, "d", axis_index_groups=[[0, 1], [2, 3]]),
                 axis_name="d", devices=jax.devices()[:4])(x, w)
  np.testing.assert_allclose(out[:, 0, 0], [1.5, 1.5, 5.5, 5.5])
  np.testing.assert_allclose(out[:, 1, 0], [1.25] * 4)


def test_axis_index_groups_under_vmap_says_what_to_do():
  x, where = batch()
  fn = jax.vmap(jax.vmap(lambda x, w: pooled(x, w, TUPLE, axis_index_groups=[[0, 1, 2, 3],
                                                                              [4, 5, 6, 7]]),
                         axis_name="b"), axis_name="a")
  with pytest.raises(NotImplementedError, match="axis of its own"):
    fn(x, where)


# --- gradients ---------------------------------------------------------------------------------

WEIGHTS = np.random.default_rng(7).standard_normal((2, C))


def pooled_loss(mode):
  """x -> a weighted sum of lane (0, 0)'s pooled mean and variance."""
  mapped = over_two_names(lambda x, w: pooled(x, w, TUPLE), mode)
  _, where = batch()
  return lambda x: jnp.sum(WEIGHTS * mapped(x, where)[0, 0])


@pytest.mark.parametrize("mode", MODES)
def test_gradients_through_the_pooled_moments(mode):
  setup_mode(mode)
  x, where = batch(offset=10.0)
  loss = jax.jit(pooled_loss(mode))  # eager vmap compiles every primitive of each derivative
  check_grads(loss, (x,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
  # and equal to the gradient of the single-device moments of all valid rows
  valid = np.broadcast_to(where, x.shape)

  def full(x):
    count = valid.sum(axis=(0, 1, 2))
    mean = jnp.sum(jnp.where(valid, x, 0), axis=(0, 1, 2)) / count
    var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0), axis=(0, 1, 2)) / count
    return jnp.sum(WEIGHTS * jnp.stack([mean, var]))

  grad = np.asarray(jax.grad(loss)(x))
  np.testing.assert_allclose(grad, jax.grad(full)(x), rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(grad[~valid], 0)  # padding gets no gradient


# --- collectives in the compiled program -------------------------------------------------------

COLLECTIVE = re.compile(r"= [^=]*\b(all-gather|all-reduce|reduce-scatter|collective-permute|"
                        r"all-to-all)(-start)?\(")


@pytest.mark.parametrize("mode,count", [("vmap", 0), ("pmap", 1), ("shard_map", 1)])
def test_collectives_in_the_compiled_program(mode, count):
  setup_mode(mode)
  x, where = batch()
  fn = over_two_names(lambda x, w: pooled(x, w, TUPLE), mode)
  text = jax.jit(fn).lower(x, where).compile().as_text()
  assert [m.group(1) for m in COLLECTIVE.finditer(text)] == ["all-gather"] * count


def test_batch_norm_layer_with_a_tuple_axis_name_under_nested_vmap():
  """``BatchNorm(axis_name=('a', 'b'))`` under ``vmap(vmap)`` (JAX's all_gather over a tuple
  fails there) equals one BatchNorm over all lanes' rows, running statistics included."""
  import jaxnorm.linen as jnn  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((A, B, ROWS, C)) * 2 + 50, jnp.float32)
  layer = jnn.BatchNorm(use_running_average=False, axis_name=TUPLE, momentum=0.5)
  variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0, 0])

  def lane(x):
    return layer.apply(variables, x, mutable=["batch_stats"])

  y, updates = jax.jit(jax.vmap(jax.vmap(lane, axis_name="b"), axis_name="a"))(x)
  whole = jnn.BatchNorm(use_running_average=False, momentum=0.5)
  y_whole, updates_whole = whole.apply(variables, x.reshape(-1, C), mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(-1, C), y_whole, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(updates["batch_stats"][name],
                               np.broadcast_to(updates_whole["batch_stats"][name], (A, B, C)),
                               rtol=1e-5)
