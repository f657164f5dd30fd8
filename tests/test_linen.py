"""jaxnorm.linen layers: float64 references, agreement with flax.linen, drop-in variable trees.

Every layer is checked against a float64 NumPy reference, against the flax.linen layer applied
to the *same* variables on data near zero (where flax is right), and for an identical variable
tree (collections, names, shapes, dtypes). A small ResNet-style model built with flax's norms is
trained a step, checkpointed with orbax and restored into the same model built with jaxnorm's.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnorm.linen as jnn
from tests import reference

# name -> (constructor kwargs, input shape, axes the statistics are over)
LAYERS = {
    "BatchNorm": ({"use_running_average": False}, (6, 5, 4), (0, 1)),
    "BatchNorm_axis1": ({"use_running_average": False, "axis": 1}, (6, 5, 4), (0, 2)),
    "LayerNorm": ({}, (3, 5, 8), (2,)),
    "LayerNorm_two_axes": ({"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (3, 5, 8), (1, 2)),
    "RMSNorm": ({}, (3, 5, 8), (2,)),
    "GroupNorm": ({"num_groups": 4}, (3, 5, 8), None),
    "GroupNorm_size": ({"num_groups": None, "group_size": 4}, (3, 5, 8), None),
    "InstanceNorm": ({}, (3, 5, 8), (1,)),
}


def layer_pair(name, **extra):
  kwargs, shape, axes = LAYERS[name]
  cls = name.split("_")[0]
  kwargs = {**kwargs, **extra}
  return getattr(jnn, cls)(**kwargs), getattr(nn, cls)(**kwargs), shape, axes


def data(shape, offset=2.0, seed=0, dtype=np.float32):
  return (np.random.default_rng(seed).standard_normal(shape) * 1.5 + offset).astype(dtype)


def randomized(variables, seed=1):
  """The variables with random params (scale near 1, bias near 0), running stats unchanged."""
  leaves, tree = jax.tree.flatten(variables["params"]) if "params" in variables else ([], None)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  params = [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys)]
  result = dict(variables)
  if tree is not None:
    result["params"] = jax.tree.unflatten(tree, params)
  return result


def reference_output(name, x, variables, where=None):
  """float64 output of the layer, from the NumPy reference and the variables."""
  kwargs, _, axes = LAYERS[name]
  cls = name.split("_")[0]
  epsilon = 1e-5 if cls == "BatchNorm" else 1e-6
  params = variables.get("params", {})
  if cls == "GroupNorm":
    groups = kwargs.get("num_groups") or x.shape[-1] // kwargs["group_size"]
    y = reference.group_norm(x, groups, where, epsilon)
  elif cls == "RMSNorm":
    y = reference.rms_norm(x, axes, where, epsilon)
  else:
    y = reference.standardize(x, axes, where, epsilon)
  feature_axes = tuple(a for a in range(x.ndim) if a not in axes) if cls == "BatchNorm" else None
  if cls in ("LayerNorm", "RMSNorm", "InstanceNorm"):
    feature_axes = LAYERS[name][0].get("feature_axes", -1)
    feature_axes = tuple(np.atleast_1d(feature_axes) % x.ndim)
  if cls == "GroupNorm":
    feature_axes = (x.ndim - 1,)
  shape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
  if "scale" in params:
    y = y * np.asarray(params["scale"], np.float64).reshape(shape)
  if "bias" in params:
    y = y + np.asarray(params["bias"], np.float64).reshape(shape)
  return y


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


# --- the same variables as flax ----------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("options", [{}, {"use_scale": False},
                                     {"use_bias": False, "param_dtype": jnp.bfloat16}])
def test_variable_tree_identical_to_flax(name, options):
  if name.startswith("RMSNorm"):
    options = {k: v for k, v in options.items() if k != "use_bias"}  # RMSNorm has no bias
  ours, theirs, shape, _ = layer_pair(name, **options)
  x = data(shape)
  ours_vars = ours.init(jax.random.key(0), x)
  flax_vars = theirs.init(jax.random.key(0), x)
  assert shapes_and_dtypes(ours_vars) == shapes_and_dtypes(flax_vars)
  for a, b in zip(jax.tree.leaves(ours_vars), jax.tree.leaves(flax_vars)):
    np.testing.assert_array_equal(a, b)  # same initial values too


def test_flax_variables_load_into_jaxnorm_layer_and_back():
  ours, theirs, x = jnn.BatchNorm(), nn.BatchNorm(), data((6, 5, 4))
  flax_vars = randomized(theirs.init(jax.random.key(0), x, use_running_average=True))
  flax_vars["batch_stats"] = {"mean": jnp.full(4, 2.0), "var": jnp.full(4, 3.0)}
  y = ours.apply(flax_vars, x, use_running_average=True)
  expected = theirs.apply(flax_vars, x, use_running_average=True)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# --- outputs: float64 reference and flax -------------------------------------------------------

@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("name", LAYERS)
def test_output_matches_float64_reference_and_flax(name, use_jit):
  ours, theirs, shape, _ = layer_pair(name)
  x = data(shape)
  variables = randomized(ours.init(jax.random.key(0), x))
  apply = functools.partial(ours.apply, mutable=["batch_stats"])
  y, _ = (jax.jit(apply) if use_jit else apply)(variables, x)
  assert y.dtype == jnp.float32
  assert reference.relative_error(y, reference_output(name, x, variables)) < 2e-5
  flax_y, _ = theirs.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, flax_y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_mask_matches_reference_and_flax(name):
  ours, theirs, shape, _ = layer_pair(name)
  x = data(shape, seed=2)
  rng = np.random.default_rng(3)
  where = rng.random(shape) < 0.7
  where.reshape(shape[0], -1)[:, :2] = True  # each example keeps some valid values
  variables = randomized(ours.init(jax.random.key(0), x))
  y, _ = ours.apply(variables, x, mask=where, mutable=["batch_stats"])
  ref = reference_output(name, x, variables, where)
  assert reference.relative_error(y, ref, where) < 5e-5
  flax_y, _ = theirs.apply(variables, x, mask=where, mutable=["batch_stats"])
  assert reference.relative_error(y, flax_y, where) < 5e-5


def test_group_norm_accepts_a_mask_that_broadcasts():
  x = data((2, 6, 8))
  where = np.random.default_rng(4).random((2, 6, 1)) < 0.6
  where[:, 0] = True
  layer = jnn.GroupNorm(num_groups=2)
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x, mask=where)
  full = layer.apply(variables, x, mask=np.broadcast_to(where, x.shape))
  np.testing.assert_allclose(y, full, atol=1e-6)


# --- running statistics ------------------------------------------------------------------------

def test_running_statistics_not_updated_at_init():
  x = data((8, 3), offset=50.0)
  variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1)
  # nor when initializing with a batch of one (common in Flax code)
  variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:1])
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_momentum_means_what_it_means_in_flax(momentum):
  x = data((10, 3), offset=5.0)
  ours = jnn.BatchNorm(use_running_average=False, momentum=momentum)
  theirs = nn.BatchNorm(use_running_average=False, momentum=momentum)
  variables = ours.init(jax.random.key(0), x)
  variables["batch_stats"] = {"mean": jnp.array([1.0, -1.0, 3.0]), "var": jnp.full(3, 2.0)}
  _, updates = ours.apply(variables, x, mutable=["batch_stats"])
  _, flax_updates = theirs.apply(variables, x, mutable=["batch_stats"])
  mean, var, count = reference.moments(x, 0)
  expected_mean = momentum * np.array([1.0, -1.0, 3.0]) + (1 - momentum) * mean.ravel()
  np.testing.assert_allclose(updates["batch_stats"]["mean"], expected_mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], flax_updates["batch_stats"]["mean"],
                             rtol=1e-5)
  unbiased = var.ravel() * count.ravel() / (count.ravel() - 1)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             momentum * 2.0 + (1 - momentum) * unbiased, rtol=1e-5)


def test_use_running_average_at_call_time_and_eval_uses_running_stats():
  x = data((6, 3))
  layer = jnn.BatchNorm()
  variables = layer.init(jax.random.key(0), x, use_running_average=True)
  variables["batch_stats"] = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1, 9])}
  y = layer.apply(variables, x, use_running_average=True)
  expected = (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1, 9]) + 1e-5)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  _, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert not np.allclose(updates["batch_stats"]["mean"], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="use_running_average"):
    jnn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_masked_batch_updates_running_stats_over_valid_rows_only():
  x = data((8, 3), offset=10.0)
  where = np.array([True, True, False, True, False, False, True, True])[:, None]
  layer = jnn.BatchNorm(use_running_average=False, momentum=0.0)
  variables = layer.init(jax.random.key(0), x)
  _, updates = layer.apply(variables, x, mask=where, mutable=["batch_stats"])
  valid = x[where[:, 0]].astype(np.float64)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], valid.mean(0), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], valid.var(0, ddof=1), rtol=1e-5)


# --- dtype and param_dtype ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
@pytest.mark.parametrize("dtype,param_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32),
                                               (None, jnp.bfloat16)])
def test_bfloat16_input_dtypes_as_flax_statistics_in_float32(name, dtype, param_dtype):
  ours, theirs, shape, _ = layer_pair(name, dtype=dtype, param_dtype=param_dtype)
  x = jnp.asarray(data(shape, offset=300.0), jnp.bfloat16)
  variables = ours.init(jax.random.key(0), x)
  y, updates = ours.apply(variables, x, mutable=["batch_stats"])
  flax_y, _ = theirs.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == flax_y.dtype
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.float32
  # The statistics come from the bfloat16 values in float32: the output is standardized to
  # bfloat16 precision, even at mean 300 where bfloat16 spacing is 2 (std 1.5).
  ref = reference_output(name, np.asarray(x, np.float32), variables)
  tolerance = 3e-2 if y.dtype == jnp.bfloat16 or param_dtype == jnp.bfloat16 else 1e-4
  assert reference.relative_error(y, ref) < tolerance
  if name == "BatchNorm":
    mean, _, _ = reference.moments(np.asarray(x, np.float32), (0, 1))
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.01 * mean.ravel(), rtol=1e-5)


def test_bfloat16_eval_keeps_float32_running_mean():
  """nnx casts a running mean of 300.3 to bfloat16 (300): jaxnorm keeps float32 statistics."""
  layer = jnn.BatchNorm(use_running_average=True, dtype=jnp.bfloat16, epsilon=0.0)
  x = jnp.full((2, 1), 302.0, jnp.bfloat16)  # exact in bfloat16 (spacing 2 at 300)
  variables = layer.init(jax.random.key(0), x)
  variables["batch_stats"] = {"mean": jnp.array([300.3]), "var": jnp.array([0.49])}
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  # (302 - 300.3) / 0.7 = 2.43; a mean cast to bfloat16 (300) would give 2.86
  np.testing.assert_allclose(np.asarray(y, np.float32), 1.7 / 0.7, rtol=1e-2)


# --- a model swaps flax.linen norms for jaxnorm.linen norms and keeps its checkpoint -----------

class ResidualBlock(nn.Module):
  norms: object  # flax.linen or jaxnorm.linen
  features: int = 8

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    y = self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    y = nn.relu(y)
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = self.norms.GroupNorm(num_groups=4)(y)
    return nn.relu(x + y)


class SmallResNet(nn.Module):
  norms: object

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = ResidualBlock(self.norms)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = self.norms.LayerNorm()(x)
    x = self.norms.RMSNorm()(x)
    return nn.Dense(10)(x)


def test_resnet_checkpoint_from_flax_norms_restores_into_jaxnorm_norms(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng(5)
  images = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 16)
  flax_model, our_model = SmallResNet(nn), SmallResNet(jnn)
  variables = jax.jit(functools.partial(flax_model.init, train=False))(jax.random.key(0), images)
  optimizer = optax.sgd(0.1)

  @jax.jit
  def flax_train_step(variables):
    def loss_fn(params):
      state = {"params": params, "batch_stats": variables["batch_stats"]}
      logits, updates = flax_model.apply(state, images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, _ = optimizer.update(grads, optimizer.init(variables["params"]))
    return {"params": optax.apply_updates(variables["params"], updates),
            "batch_stats": batch_stats}

  trained = flax_train_step(variables)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "flax", trained)
  checkpointer.wait_until_finished()

  our_abstract = jax.eval_shape(functools.partial(our_model.init, train=False),
                                jax.random.key(1), images)
  assert shapes_and_dtypes(our_abstract) == shapes_and_dtypes(variables)
  restored = checkpointer.restore(tmp_path / "flax", our_abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(trained)

  def outputs(model, variables):
    """Eval-mode output, and train-mode output with its running statistics."""
    evaluation = model.apply(variables, images, train=False)
    training, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return evaluation, training, updates["batch_stats"]

  ours = jax.jit(functools.partial(outputs, our_model))(restored)
  theirs = jax.jit(functools.partial(outputs, flax_model))(trained)
  assert np.all(np.isfinite(ours[0]))
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-4)  # eval mode
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-4)  # train mode
  # the running means move the same way; the variances by the unbiased n / (n - 1)
  for path, ours_mean in jax.tree_util.tree_leaves_with_path(ours[2]):
    if path[-1].key == "mean":
      theirs_mean = functools.reduce(lambda t, k: t[k.key], path, theirs[2])
      np.testing.assert_allclose(ours_mean, theirs_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [
    jnn.BatchNorm(), jnn.BatchRenorm(), jnn.GhostBatchNorm(virtual_batch_size=2),
    jnn.LpBatchNorm(p=1)], ids=lambda layer: type(layer).__name__)
def test_batch_norm_family_shares_one_training_rule_and_one_store(layer, monkeypatch):
  """Initializing with a batch of one evaluates, and running statistics are stored in training
  only after init: one rule in linen_norms, used by every batch-norm layer."""
  from jaxnorm._src import linen_norms  # pylint: disable=import-outside-toplevel
  modes, stores = [], []
  rule, store = linen_norms.batch_norm_training, linen_norms.store_running_stats

  def recorded_rule(*args, **kwargs):
    modes.append(rule(*args, **kwargs))
    return modes[-1]

  def recorded_store(module, training, variables, new_state):
    stores.append((training, module.is_initializing()))
    return store(module, training, variables, new_state)

  monkeypatch.setattr(linen_norms, "batch_norm_training", recorded_rule)
  monkeypatch.setattr(linen_norms, "store_running_stats", recorded_store)
  x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) + 5
  variables = layer.init(jax.random.key(0), x[:1], use_running_average=False)  # evaluates
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)
  _, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert modes == [False, True] and stores == [(False, True), (True, False)]
  assert np.all(np.asarray(updates["batch_stats"]["mean"]) > 0)
  _, updates = layer.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], 0)
