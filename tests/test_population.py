"""recompute_batch_stats: each batch-norm layer gets the exact statistics of all its inputs.

The reference is float64 NumPy over the concatenated inputs of each layer, captured
independently of the code under test (flax's ``capture_intermediates`` on the layer before each
norm, in training mode, or inputs computed directly), on unequal batches, masks, data far from
zero, nested modules and flax's own BatchNorm; across devices, with ``axis_name`` under
``vmap`` and ``shard_map`` and under sharded ``jit``.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import core
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

OFFSET = 1e4
SIZES = (5, 3, 5)  # unequal batches (two shapes: two traces)


def unbiased(a, axis=0):
  return np.var(a, axis=axis, ddof=1)


def data(sizes=SIZES, features=3, offset=OFFSET, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((n, features)) * np.array([1.0, 2.0, 0.5][:features])
           + offset).astype(np.float32) for n in sizes]


class Block(nn.Module):
  """A nested block: Dense then flax's BatchNorm (biased running variance)."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4, name="dense")(x)
    return nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)


class Net(nn.Module):
  """jaxnorm BatchNorm on the input (far from zero), a nested block, a second jaxnorm norm."""

  @nn.compact
  def __call__(self, x, train=False):
    x = jnn.BatchNorm(use_running_average=not train, name="bn_in")(x)
    x = Block(name="block")(x, train)
    x = nn.Dense(2, name="head")(nn.relu(x))
    return jnn.GhostBatchNorm(name="bn_out")(x, use_running_average=not train)


@pytest.fixture(scope="module")
def net():
  model = Net()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 3)))
  return model, variables


def captured_inputs(model, variables, batches):
  """The inputs of each norm in training mode, from flax's capture_intermediates (float64)."""
  inputs = {"bn_in": [], "block/flax_bn": [], "bn_out": []}
  apply = jax.jit(lambda x: model.apply(variables, x, train=True, capture_intermediates=True,
                                        mutable=["batch_stats", "intermediates"]))
  for x in batches:
    _, state = apply(x)
    found = state["intermediates"]
    inputs["bn_in"].append(x)
    inputs["block/flax_bn"].append(found["block"]["dense"]["__call__"][0])
    inputs["bn_out"].append(found["head"]["__call__"][0])
  return {k: np.concatenate([np.asarray(a, np.float64) for a in v]) for k, v in inputs.items()}


def stats_at(variables, path):
  node = variables["batch_stats"]
  for name in path.split("/"):
    node = node[name]
  return np.asarray(node["mean"]), np.asarray(node["var"])


def test_linen_nested_unequal_batches_far_from_zero_match_float64(net):
  model, variables = net
  batches = data()
  new = jnn.recompute_batch_stats(model, variables, batches)  # the model passes train=False
  inputs = captured_inputs(model, variables, batches)
  for path, values in inputs.items():
    mean, var = stats_at(new, path)
    expected_var = np.var(values, 0) if path == "block/flax_bn" else unbiased(values)
    scale = np.abs(values).max(0)
    np.testing.assert_allclose(mean, values.mean(0), rtol=0, atol=2e-6 * scale.max(), err_msg=path)
    np.testing.assert_allclose(var, expected_var, rtol=1e-4, err_msg=path)
  # In training mode, bn_in normalizes with batch statistics: the head sees O(1) values.
  assert np.abs(inputs["bn_out"]).max() < 100
  np.testing.assert_allclose(stats_at(new, "bn_in")[0], np.concatenate(batches).mean(0),
                             rtol=1e-6)


def test_linen_is_not_an_average_of_batch_statistics(net):
  model, variables = net
  batches = data(offset=0.0, seed=3)
  new = jnn.recompute_batch_stats(model, variables, batches)
  mean, var = stats_at(new, "bn_in")
  naive_var = np.mean([unbiased(b.astype(np.float64)) for b in batches], 0)
  whole = np.concatenate(batches).astype(np.float64)
  np.testing.assert_allclose(var, unbiased(whole), rtol=1e-5)
  assert np.max(np.abs(naive_var - unbiased(whole)) / unbiased(whole)) > 1e-2


def test_linen_leaves_everything_else_untouched(net):
  model, variables = net
  frozen = core.freeze(variables)
  new = jnn.recompute_batch_stats(model, frozen, data())
  assert isinstance(new, core.FrozenDict)
  jax.tree.map(np.testing.assert_array_equal, new["params"], frozen["params"])
  assert jax.tree.structure(new) == jax.tree.structure(frozen)
  for leaf in jax.tree.leaves(new["batch_stats"]):
    assert leaf.dtype == jnp.float32


class Masked(nn.Module):
  """Norms that take a mask: a jaxnorm BatchRenorm and flax's BatchNorm, on (batch, time, c)."""

  @nn.compact
  def __call__(self, batch):
    x, mask = batch
    y = jnn.BatchRenorm(use_running_average=True, name="renorm")(x, mask=mask)
    return y + nn.BatchNorm(use_running_average=True, name="flax_bn")(x, mask=mask)


def test_masks_count_exactly_and_renorm_step_is_kept():
  rng = np.random.default_rng(1)
  batches, valid = [], []
  for n, t in ((2, 5), (3, 5), (3, 5)):
    x = (rng.standard_normal((n, t, 2)) + OFFSET).astype(np.float32)
    mask = rng.random((n, t, 1)) < 0.6
    mask[0, 0] = True
    x[~mask[..., 0]] = 1e6  # padding that must not count
    batches.append((x, mask))
    valid.append(x[mask[..., 0]].astype(np.float64))
  model = Masked()
  variables = model.init(jax.random.key(0), batches[0])
  variables["batch_stats"]["renorm"]["step"] = jnp.array(7, jnp.int32)
  new = jnn.recompute_batch_stats(model, variables, batches)
  values = np.concatenate(valid)
  mean, var = stats_at(new, "renorm")
  np.testing.assert_allclose(mean, values.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, unbiased(values), rtol=1e-4)
  mean, var = stats_at(new, "flax_bn")
  np.testing.assert_allclose(mean, values.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, np.var(values, 0), rtol=1e-4)
  assert int(new["batch_stats"]["renorm"]["step"]) == 7


class Conditional(nn.Module):
  @nn.compact
  def __call__(self, batch):
    x, labels = batch
    x = jnn.ConditionalBatchNorm(num_classes=3, use_running_average=True)(x, labels)
    return jnn.LpBatchNorm(p=2, use_running_average=True, axis=(1, 2))(x)


def test_conditional_and_multi_axis_norms():
  rng = np.random.default_rng(2)
  batches = [(rng.standard_normal((n, 2, 3)).astype(np.float32) * 3 + 1,
              rng.integers(0, 3, n)) for n in (5, 5)]
  model = Conditional()
  variables = model.init(jax.random.key(0), batches[0])
  new = jnn.recompute_batch_stats(model, variables, batches)
  x = np.concatenate([b[0] for b in batches]).astype(np.float64)
  mean, var = stats_at(new, "ConditionalBatchNorm_0")
  np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, unbiased(x.reshape(-1, 3)), rtol=1e-5)
  assert stats_at(new, "LpBatchNorm_0")[0].shape == (2, 3)


def test_one_trace_for_equal_batches_under_jit():
  traces = []

  class Counted(nn.Module):
    @nn.compact
    def __call__(self, x):
      traces.append(1)
      return jnn.BatchNorm(use_running_average=True)(x)

  model = Counted()
  variables = model.init(jax.random.key(0), jnp.zeros((4, 3)))
  traces.clear()
  jnn.recompute_batch_stats(model, variables, data(sizes=(4, 4, 4, 4)))
  assert len(traces) == 1


def test_errors_name_the_fix(net):
  model, variables = net
  with pytest.raises(ValueError, match="no batches"):
    jnn.recompute_batch_stats(model, variables, [])
  dense = nn.Dense(2)
  with pytest.raises(ValueError, match="no batch-norm layer"):
    jnn.recompute_batch_stats(dense, dense.init(jax.random.key(0), jnp.zeros((2, 3))), data())
  masked = Masked()
  x = np.ones((2, 3, 2), np.float32)
  mask = np.zeros((2, 3, 1), bool)
  masked_variables = masked.init(jax.random.key(0), (x, mask))
  with pytest.raises(ValueError, match="no valid input"):
    jnn.recompute_batch_stats(masked, masked_variables, [(x, mask), (x, mask)])
  lp = jnn.LpBatchNorm(p=math.inf, use_running_average=True)
  with pytest.raises(ValueError, match="p=inf"):
    jnn.recompute_batch_stats(lp, lp.init(jax.random.key(0), x[:, 0]), [x[:, 0]])


DEVICES = 8
VALID_ROWS = [4, 1, 1, 0, 2, 3, 0, 4]


def device_batches():
  """Two batches of 8 devices x 4 rows, each device with its own number of valid rows."""
  rng = np.random.default_rng(4)
  out = []
  for shift in (0, 1):
    x = (rng.standard_normal((DEVICES, 4, 2)) + OFFSET).astype(np.float32)
    mask = np.zeros((DEVICES, 4, 1), bool)
    for d, valid in enumerate(VALID_ROWS):
      mask[d, :(valid + shift) % 5] = True
    out.append((x, mask))
  return out


class Synced(nn.Module):
  @nn.compact
  def __call__(self, batch):
    x, mask = batch
    return jnn.BatchNorm(use_running_average=True, axis_name="d")(x, mask=mask)


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_axis_name_pools_count_weighted_over_devices(mode):
  if jax.device_count() < DEVICES:
    pytest.skip("needs 8 devices (conftest.py sets 8 host devices)")
  model = Synced()
  batches = device_batches()
  variables = model.init(jax.random.key(0), (batches[0][0][0], batches[0][1][0]))

  def local(batches):
    return jnn.recompute_batch_stats(model, variables, batches)["batch_stats"]

  if mode == "vmap":
    stats = jax.vmap(local, axis_name="d")(batches)
  else:
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("d",))
    squeeze = lambda b: [(x[0], m[0]) for x, m in b]  # noqa: E731
    stats = jax.jit(jax.shard_map(lambda b: jax.tree.map(lambda a: a[None], local(squeeze(b))),
                                  mesh=mesh, in_specs=P("d"), out_specs=P("d")))(batches)
  values = np.concatenate([x[m[..., 0]] for x, m in batches]).astype(np.float64)
  for device in range(DEVICES):
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"][device], values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"][device], unbiased(values), rtol=1e-4)


def test_sharded_jit_equals_one_device():
  if jax.device_count() < DEVICES:
    pytest.skip("needs 8 devices (conftest.py sets 8 host devices)")
  model = nn.Sequential([jnn.BatchNorm(use_running_average=True), nn.Dense(3),
                         nn.BatchNorm(use_running_average=True)])
  variables = model.init(jax.random.key(0), jnp.zeros((2, 3)))
  batches = data(sizes=(16, 16))
  sharding = NamedSharding(Mesh(np.array(jax.devices()[:DEVICES]), ("d",)), P("d"))
  sharded = [jax.device_put(b, sharding) for b in batches]
  expected = jnn.recompute_batch_stats(model, variables, batches)
  got = jnn.recompute_batch_stats(model, variables, sharded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got["batch_stats"], expected["batch_stats"])


class NnxNet(nnx.Module):
  """Two branches from the input: jaxnorm's BatchNorm on x, flax's after a Linear (nested)."""

  def __init__(self, rngs):
    self.bn = jnnx.BatchNorm(3, use_running_average=True)
    self.branch = nnx.Sequential(nnx.Linear(3, 3, rngs=rngs),
                                 nnx.BatchNorm(3, use_running_average=True, rngs=rngs))
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.bn(x) + self.branch(x))


def test_nnx_in_place_matches_float64_and_restores_the_layers():
  model = NnxNet(nnx.Rngs(0))
  batches = data()
  linear = model.branch.layers[0]
  before = nnx.state(model, nnx.Any(nnx.Param, nnx.RngCount))
  jnnx.recompute_batch_stats(model, batches)
  x = np.concatenate(batches).astype(np.float64)
  np.testing.assert_allclose(model.bn.mean[...], x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], unbiased(x), rtol=1e-4)
  h = np.concatenate([np.asarray(linear(jnp.asarray(b)), np.float64) for b in batches])
  flax_bn = model.branch.layers[1]
  np.testing.assert_allclose(flax_bn.mean[...], h.mean(0), rtol=1e-5)
  np.testing.assert_allclose(flax_bn.var[...], np.var(h, 0), rtol=1e-3)
  assert type(model.bn) is jnnx.BatchNorm and type(flax_bn) is nnx.BatchNorm
  assert model.bn.use_running_average is True and flax_bn.use_running_average is True
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Any(nnx.Param, nnx.RngCount)),
               before)


def test_nnx_errors_and_layers_restored_after_an_error():
  with pytest.raises(ValueError, match="no batch-norm layer"):
    jnnx.recompute_batch_stats(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), data())
  model = NnxNet(nnx.Rngs(0))
  with pytest.raises(ValueError, match="no batches"):
    jnnx.recompute_batch_stats(model, iter(()))
  with pytest.raises(ValueError, match="BatchNorm\\(num_features=3\\) got x.shape=\\(2, 5\\)"):
    jnnx.recompute_batch_stats(model, [np.ones((2, 5), np.float32)])  # wrong width
  assert type(model.bn) is jnnx.BatchNorm
  x = np.ones((4, 3), np.float32)
  bn = jnnx.BatchNorm(3)
  with pytest.raises(ValueError, match="no valid input"):
    jnnx.recompute_batch_stats(bn, [x], mask=np.zeros((4, 1), bool))


def test_linen_under_an_outer_jit_equals_eager():
  model = jnn.BatchNorm(use_running_average=True)
  batches = data(sizes=(4, 6))
  variables = model.init(jax.random.key(0), batches[0])
  jitted = jax.jit(lambda v, b: jnn.recompute_batch_stats(model, v, b))(variables, batches)
  eager = jnn.recompute_batch_stats(model, variables, batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jitted, eager)


def test_flax_rule_option_stores_the_biased_variance():
  batches = data(sizes=(4, 6))
  x = np.concatenate(batches).astype(np.float64)
  model = jnn.BatchNorm(use_running_average=True, unbiased_running_var=False)
  new = jnn.recompute_batch_stats(model, model.init(jax.random.key(0), batches[0]), batches)
  np.testing.assert_allclose(new["batch_stats"]["var"], np.var(x, 0), rtol=1e-4)
  layer = jnnx.BatchNorm(3, unbiased_running_var=False)
  jnnx.recompute_batch_stats(layer, batches)
  np.testing.assert_allclose(layer.var[...], np.var(x, 0), rtol=1e-4)
  assert layer.use_running_average is False  # its own setting, restored
