"""Statistics pooled across 8 host devices equal those of all valid elements on one device.

Each device holds a slice of the batch (or of the features, for layer norm) with its own mask:
unequal counts, and one or two devices with no valid element at all. Under ``jax.vmap``,
``jax.pmap`` and ``jax.shard_map`` (with ``axis_name``) and under sharded ``jit`` (without), the
outputs, the statistics, the running statistics and the input gradients must be those of the
single-device computation on the whole batch, nothing may be NaN, and each synced call must
compile to exactly one collective.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn
from tests import reference

DEVICES = 8
ROWS = 4  # rows of the batch per device
VALID_ROWS = [4, 1, 1, 0, 2, 3, 0, 4]  # per device: unequal, two devices fully masked
MODES = ["vmap", "pmap", "shard_map"]


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  if jax.device_count() < DEVICES:
    pytest.skip(f"needs {DEVICES} devices (conftest.py sets 8 host devices)")


def mesh():
  return Mesh(np.array(jax.devices()[:DEVICES]), ("d",))


def batch(offset=1e3, seed=0, channels=3):
  """x of shape (DEVICES * ROWS, channels) and a row mask with VALID_ROWS valid rows per device."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((DEVICES * ROWS, channels)) * 2 + offset).astype(np.float32)
  where = np.zeros((DEVICES * ROWS, 1), bool)
  for device, valid in enumerate(VALID_ROWS):
    where[device * ROWS:device * ROWS + valid] = True
  x[~where[:, 0]] = rng.standard_normal((int((~where).sum()), channels)) * 1e4  # padding
  return x, where


def per_device(a):
  """(DEVICES * n, ...) -> (DEVICES, n, ...): device d holds rows d*n ... (d+1)*n - 1."""
  return a.reshape(DEVICES, -1, *a.shape[1:])


def map_over_devices(fn, mode, *, check_vma=True):
  """fn(local args) with axis_name "d" mapped over the leading axis of every argument.

  vmap under jit: eager vmap compiles every batched primitive on its own (eager vmap with
  ``axis_name`` runs in test_stats.py and test_complex.py)."""
  if mode == "vmap":
    return jax.jit(jax.vmap(fn, axis_name="d"))
  if mode == "pmap":
    return jax.pmap(fn, axis_name="d", devices=jax.devices()[:DEVICES])

  def local(*args):
    outputs = fn(*(a[0] for a in args))
    return jax.tree.map(lambda o: o[None], outputs)

  return jax.jit(jax.shard_map(local, mesh=mesh(), in_specs=P("d"), out_specs=P("d"),
                               check_vma=check_vma))


def assert_close_on_valid(actual, expected, where, atol):
  actual = np.asarray(actual)
  assert np.all(np.isfinite(actual[np.broadcast_to(where, actual.shape)]))
  assert reference.max_error(actual, expected, np.broadcast_to(where, actual.shape)) < atol


# --- statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_moments_equal_single_device_statistics(mode):
  x, where = batch()
  fn = map_over_devices(
      lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"), mode)
  mean, var = fn(per_device(x), per_device(where))
  ref_mean, ref_var, _ = reference.moments(x, 0, where)
  assert mean.shape == var.shape == (DEVICES, 3)
  for device in range(DEVICES):  # every device, the fully masked ones too, sees the same
    np.testing.assert_allclose(mean[device], ref_mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(var[device], ref_var.ravel(), rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_anchor_counts_8_1_1_1_give_the_count_weighted_mean(mode):
  """ANCHORS.md: 8, 1, 1, 1 valid rows (0 on the first device, 10 on the others): 30/11."""
  x = np.zeros((DEVICES, 8, 1), np.float32)
  where = np.zeros((DEVICES, 8, 1), bool)
  where[0] = True
  for device in (1, 2, 3):
    x[device, 0], where[device, 0] = 10.0, True
  x[4:] = np.nan  # four devices hold nothing valid, only NaN padding
  fn = map_over_devices(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"), mode)
  mean, var = fn(x, where)
  np.testing.assert_allclose(mean, np.full((DEVICES, 1), 30 / 11), rtol=1e-6)
  np.testing.assert_allclose(var, np.full((DEVICES, 1), 8 * (30 / 11) ** 2 / 11
                                          + 3 * (10 - 30 / 11) ** 2 / 11), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_output_and_running_statistics_equal_full_batch(mode):
  x, where = batch(offset=1e5)
  rng = np.random.default_rng(1)
  scale = rng.standard_normal(3).astype(np.float32)
  bias = rng.standard_normal(3).astype(np.float32)
  running = jaxnorm.BatchStats(jnp.arange(3.0), jnp.full(3, 2.0))
  step = functools.partial(jaxnorm.batch_norm, running=running, scale=scale, bias=bias,
                           training=True, momentum=0.9)
  full_y, full_running = step(x, where=where)
  fn = map_over_devices(lambda x, w: step(x, where=w, axis_name="d"), mode)
  y, new_running = fn(per_device(x), per_device(where))
  assert_close_on_valid(y.reshape(x.shape), full_y, where, 2e-5)
  mean, var, count = reference.moments(x, 0, where)
  for device in range(DEVICES):
    np.testing.assert_allclose(new_running.mean[device], full_running.mean, rtol=1e-6)
    np.testing.assert_allclose(new_running.var[device], full_running.var, rtol=1e-5)
  np.testing.assert_allclose(full_running.var, 0.9 * 2 + 0.1 * (var * count / (count - 1)).ravel(),
                             rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_feature_sharded_layer_and_rms_norm_equal_whole_row(mode, norm):
  """Tensor-parallel layer norm: each device holds 4 of the 32 features, masks unequal."""
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((5, DEVICES * 4)) + 1e4).astype(np.float32)
  valid_features = np.zeros((1, DEVICES * 4), bool)
  for device, valid in enumerate(VALID_ROWS):
    valid_features[0, device * 4:device * 4 + valid] = True
  fn_local = jaxnorm.layer_norm if norm == "layer" else jaxnorm.rms_norm
  full = fn_local(x, where=valid_features)
  sharded_x = x.reshape(5, DEVICES, 4).transpose(1, 0, 2)
  sharded_w = valid_features.reshape(1, DEVICES, 4).transpose(1, 0, 2)
  fn = map_over_devices(lambda x, w: fn_local(x, where=w, axis_name="d"), mode)
  y = np.asarray(fn(sharded_x, sharded_w)).transpose(1, 0, 2).reshape(x.shape)
  where = np.broadcast_to(valid_features, x.shape)
  assert_close_on_valid(y, full, where, 1e-4)
  ref = (reference.standardize(x, (1,), where, 1e-6) if norm == "layer"
         else reference.rms_norm(x, (1,), where, 1e-6))
  assert_close_on_valid(y, ref, where, 1e-4)


def test_every_device_empty_gives_zeros_not_nan():
  x = np.full((DEVICES, 2, 3), np.nan, np.float32)
  where = np.zeros((DEVICES, 2, 1), bool)
  for mode in ("pmap", "shard_map"):
    fn = map_over_devices(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"), mode)
    mean, var = fn(x, where)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, 0)


# --- gradients ---------------------------------------------------------------------------------

def weighted_loss(y, weights, where):
  return jnp.sum(jnp.where(where, y * weights, 0))


def synced_loss(x, w, weights, scale, axis_name=None):
  y, _ = jaxnorm.batch_norm(x, None, scale, training=True, where=w, axis_name=axis_name)
  return weighted_loss(y, weights, w)


# the full-batch gradient, compiled once for the four cases below
full_batch_gradient = jax.jit(jax.grad(synced_loss, argnums=(0, 3)))


@pytest.mark.parametrize("mode,check_vma", [("vmap", True), ("pmap", True), ("shard_map", True),
                                            ("shard_map", False)])
def test_input_gradient_through_synced_statistics_equals_full_batch(mode, check_vma):
  x, where = batch(offset=10.0)
  weights = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
  scale = jnp.asarray([0.5, 2.0, -1.0])
  loss = synced_loss
  full_dx, full_dscale = full_batch_gradient(x, where, weights, scale)
  args = (per_device(x), per_device(where), per_device(weights))
  if mode == "vmap":
    def total(x, w, weights, scale):
      per = jax.vmap(functools.partial(loss, axis_name="d"), in_axes=(0, 0, 0, None),
                     axis_name="d")(x, w, weights, scale)
      return jnp.sum(per)
    dx, dscale = jax.jit(jax.grad(total, argnums=(0, 3)))(*args, scale)  # eager: slow
  elif mode == "pmap":
    # pmap's convention: the gradient of the sum of the devices' losses, psum'd for parameters
    grad = jax.pmap(jax.grad(functools.partial(loss, axis_name="d"), argnums=(0, 3)),
                    axis_name="d", in_axes=(0, 0, 0, None), devices=jax.devices()[:DEVICES])
    dx, dscale = grad(*args, scale)
    dscale = jnp.sum(dscale, axis=0)
  else:
    def local(x, w, weights, scale):
      per_device_loss = loss(x[0], w[0], weights[0], scale, axis_name="d")
      return jax.lax.psum(per_device_loss, "d")

    total = jax.shard_map(local, mesh=mesh(), in_specs=(P("d"), P("d"), P("d"), P()),
                          out_specs=P(), check_vma=check_vma)
    dx, dscale = jax.jit(jax.grad(total, argnums=(0, 3)))(*args, scale)
  dx = np.asarray(dx).reshape(x.shape)
  assert np.all(np.isfinite(dx))
  np.testing.assert_allclose(dx, full_dx, atol=2e-5)
  np.testing.assert_array_equal(dx[~where[:, 0]], 0)  # padding gets no gradient
  np.testing.assert_allclose(dscale, full_dscale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_layer_norm_input_gradient_with_sharded_features(mode):
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((3, DEVICES * 2)) + 50).astype(np.float32)
  weights = rng.standard_normal(x.shape).astype(np.float32)
  full = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x) * weights)))(x)
  sharded = lambda a: a.reshape(3, DEVICES, 2).transpose(1, 0, 2)
  if mode == "vmap":
    total = lambda xs: jnp.sum(
        jax.vmap(lambda x: jaxnorm.layer_norm(x, axis_name="d"), axis_name="d")(xs)
        * sharded(weights))
  else:
    mapped = jax.shard_map(
        lambda x, w: jax.lax.psum(jnp.sum(jaxnorm.layer_norm(x[0], axis_name="d") * w[0]), "d"),
        mesh=mesh(), in_specs=P("d"), out_specs=P())
    total = lambda xs: mapped(xs, sharded(weights))
  dx = jax.jit(jax.grad(total))(sharded(x))
  np.testing.assert_allclose(np.asarray(dx).transpose(1, 0, 2).reshape(x.shape), full, atol=2e-4)


# --- one collective per synced call ------------------------------------------------------------

COLLECTIVE = re.compile(r"= [^=]*\b(all-gather|all-reduce|reduce-scatter|collective-permute|"
                        r"all-to-all)(-start)?\(")


def collectives(compiled_text):
  return [m.group(1) for m in COLLECTIVE.finditer(compiled_text)]


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
@pytest.mark.parametrize("name", ["moments", "batch_norm", "layer_norm", "rms_norm", "group_norm"])
def test_one_collective_per_synced_call(mode, name):
  x, where = batch(channels=4)
  fns = {
      "moments": lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"),
      "batch_norm": lambda x, w: jaxnorm.batch_norm(
          x, jaxnorm.init_batch_stats(4), training=True, where=w, axis_name="d"),
      "layer_norm": lambda x, w: jaxnorm.layer_norm(x, where=w, axis_name="d"),
      "rms_norm": lambda x, w: jaxnorm.rms_norm(x, where=w, axis_name="d"),
      "group_norm": lambda x, w: jaxnorm.group_norm(x, num_groups=2, where=w, axis_name="d"),
  }
  fn = map_over_devices(fns[name], mode)
  text = fn.lower(per_device(x), per_device(where)).compile().as_text()
  assert len(collectives(text)) == 1, collectives(text)
  # Two synced layers in one step: two collectives, not more.
  two = map_over_devices(lambda x, w: fns[name](fns["layer_norm"](x, w), w), mode)
  text = two.lower(per_device(x), per_device(where)).compile().as_text()
  assert len(collectives(text)) == 2, collectives(text)


# --- sharded jit: no axis_name -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["moments", "batch_norm", "layer_norm"])
def test_sharded_jit_equals_single_device(name):
  x, where = batch(offset=1e4, channels=8)
  if name == "layer_norm":  # features sharded across the devices
    x, where = x.T.copy(), np.broadcast_to(where.T, (8, x.shape[0])).copy()
    spec = P(None, "d")
  else:
    spec = P("d")
  fn = {
      "moments": lambda x, w: jaxnorm.moments(x, 0, where=w),
      "batch_norm": lambda x, w: jaxnorm.batch_norm(
          x, jaxnorm.init_batch_stats(8), training=True, where=w),
      "layer_norm": lambda x, w: jaxnorm.layer_norm(x, where=w),
  }[name]
  sharding = NamedSharding(mesh(), spec)
  xs, ws = jax.device_put(x, sharding), jax.device_put(where, sharding)
  compiled = jax.jit(fn).lower(xs, ws).compile()
  assert collectives(compiled.as_text()), "the computation was not distributed"
  sharded = compiled(xs, ws)
  single = jax.jit(fn)(x, where)
  for s, r in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, r, rtol=1e-5, atol=1e-5)
  if name == "moments":
    ref_mean, ref_var, _ = reference.moments(x, 0, where)
    np.testing.assert_allclose(sharded[0], ref_mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(sharded[1], ref_var.ravel(), rtol=1e-4)


# --- the Linen layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_linen_batch_norm_axis_name_updates_running_stats_as_full_batch(mode):
  x, where = batch(offset=100.0)
  layer = jnn.BatchNorm(use_running_average=False, momentum=0.8)
  synced = jnn.BatchNorm(use_running_average=False, momentum=0.8, axis_name="d")
  variables = layer.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + 0.5, variables)  # not the initial values
  full_y, full_updates = layer.apply(variables, x, mask=where, mutable=["batch_stats"])

  def step(variables, x, w):
    return synced.apply(variables, x, mask=w, mutable=["batch_stats"])

  if mode == "pmap":
    y, updates = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0),
                          devices=jax.devices()[:DEVICES])(variables, per_device(x),
                                                           per_device(where))
    updates = jax.tree.map(lambda u: u[3], updates)  # a fully masked device's copy
  else:
    # Variables replicated in and out (out_specs=P()): the pooled statistics are the same on
    # every device, and typed so.
    y, updates = jax.jit(jax.shard_map(
        lambda v, x, w: step(v, x, w), mesh=mesh(), in_specs=(P(), P("d"), P("d")),
        out_specs=(P("d"), P())))(variables, x, where)
  assert_close_on_valid(np.asarray(y).reshape(x.shape), full_y, where, 2e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(updates["batch_stats"][key], full_updates["batch_stats"][key],
                               rtol=1e-5)
