"""Frozen batch norm: evaluation-mode outputs, unchanged statistics, and frozen parameters.

Inside ``frozen_batch_norm`` a model that asks for training mode in every way flax allows (the
attribute, the call argument) must give exactly the output of the same model built with
``use_running_average=True``, and its ``batch_stats`` must come back unchanged; the optax mask
and labels must freeze exactly the batch-norm parameters in a real optimizer step. For NNX, the
flax one-liner and the ``wrt`` filter do the same.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx


class Backbone(nn.Module):
  """Every kind of batch norm, asking for training mode by attribute or by argument."""
  train: bool = True

  @nn.compact
  def __call__(self, x, labels):
    x = nn.Dense(4)(x)
    x = jnn.BatchNorm(use_running_average=not self.train)(x)
    x = nn.BatchNorm()(x, use_running_average=not self.train)
    x = jnn.BatchRenorm(use_running_average=not self.train)(x)
    x = jnn.ConditionalBatchNorm(num_classes=2)(x, labels, not self.train)
    x = nn.Dropout(0.5, deterministic=True)(x)
    return nn.Dense(2)(x)


@pytest.fixture(scope="module")
def trained():
  """A Backbone with random running statistics (far from init values) and its inputs."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, 1, 1, 0])
  variables = Backbone().init(jax.random.key(0), x, labels)
  keys = iter(jax.random.split(jax.random.key(1), 100))

  def randomize(path, leaf):
    name = path[-1].key
    if name == "mean":
      return jax.random.normal(next(keys), leaf.shape)
    if name == "var":
      return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=2.0)
    return leaf

  variables = {**variables,
               "batch_stats": jax.tree_util.tree_map_with_path(randomize,
                                                               variables["batch_stats"])}
  return variables, x, labels


@pytest.mark.parametrize("jit", [False, True])
def test_frozen_equals_evaluation_and_keeps_batch_stats(trained, jit):
  variables, x, labels = trained
  model = Backbone(train=True)

  def frozen_step(variables, x, labels):
    return model.apply(variables, x, labels, mutable=["batch_stats"])

  step = jax.jit(frozen_step) if jit else frozen_step
  with jnn.frozen_batch_norm():
    y, updates = step(variables, x, labels)
  expected = Backbone(train=False).apply(variables, x, labels)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  # Outside the context the same model trains: its statistics move and its output differs.
  y_train, updates = model.apply(variables, x, labels, mutable=["batch_stats"])
  assert np.abs(np.asarray(y_train) - np.asarray(expected)).max() > 1e-2
  assert np.abs(updates["batch_stats"]["BatchNorm_0"]["mean"]
                - variables["batch_stats"]["BatchNorm_0"]["mean"]).max() > 1e-4


def test_frozen_gradients_flow_through_the_running_statistics(trained):
  variables, x, labels = trained
  model = Backbone(train=True)

  def loss(params, model):
    return jnp.sum(model.apply({**variables, "params": params}, x, labels,
                               mutable=["batch_stats"])[0] ** 2)

  with jnn.frozen_batch_norm():
    grads = jax.grad(loss)(variables["params"], model)
  expected = jax.grad(loss)(variables["params"], Backbone(train=False))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               expected)


def test_mask_and_labels_freeze_batch_norm_params_in_a_real_optax_step(trained):
  variables, x, labels = trained
  params = variables["params"]
  mask = jnn.batch_norm_param_mask(variables)
  assert mask["BatchNorm_0"] == {"scale": True, "bias": True}
  assert mask["ConditionalBatchNorm_0"] == {"scale": True, "bias": True}
  assert mask["Dense_0"] == {"kernel": False, "bias": False}
  assert jax.tree.structure(mask) == jax.tree.structure(
      jax.tree.map(lambda _: True, params))

  def loss(params):
    return jnp.sum(Backbone().apply({**variables, "params": params}, x, labels,
                                    mutable=["batch_stats"])[0] ** 2)

  grads = jax.grad(loss)(params)
  label_tree = jnn.batch_norm_param_labels(variables, batch_norm="frozen", other="train")
  transforms = {
      "multi_transform": optax.multi_transform(
          {"train": optax.adam(0.1), "frozen": optax.set_to_zero()}, label_tree),
      "masked": optax.chain(optax.masked(optax.set_to_zero(), mask), optax.adam(0.1)),
  }
  for name, tx in transforms.items():
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for path, is_bn in jax.tree_util.tree_leaves_with_path(mask):
      old_leaf = _at(params, path)
      changed = np.abs(np.asarray(_at(new, path)) - np.asarray(old_leaf)).max() > 0
      assert changed != is_bn, (name, path)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_mask_needs_batch_stats():
  model = nn.Sequential([nn.Dense(2), jnn.BatchNorm(use_running_average=True)])
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="not variables\\['params'\\]"):
    jnn.batch_norm_param_mask(variables["params"])


class NnxBackbone(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.block = nnx.Sequential(jnnx.BatchNorm(4), nnx.BatchNorm(4, rngs=rngs),
                                jnnx.BatchRenorm(4))
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(self.block(self.linear(x))))


def test_nnx_one_liner_freezes_statistics_and_keeps_dropout():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
  model = NnxBackbone(nnx.Rngs(0))
  model(x)  # one training step: running statistics away from their initial values
  model.set_attributes(use_running_average=True, raise_if_not_found=False)
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  y = model(x)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), stats)
  assert model.dropout.deterministic is False  # only batch norm changed
  model.dropout.deterministic = True
  reference = nnx.view(model, use_running_average=True, deterministic=True)
  np.testing.assert_allclose(reference(x), model(x), rtol=1e-6)
  assert not np.allclose(y, model(x))  # dropout was live in y


def test_nnx_optimizer_wrt_filter_leaves_batch_norm_params():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
  model = NnxBackbone(nnx.Rngs(0))
  model.set_attributes(use_running_average=True, deterministic=True, raise_if_not_found=False)
  trainable = nnx.All(nnx.Param, nnx.Not(jnnx.batch_norm_param_filter(model)))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable)
  def value_of(param):
    return np.array(param[...])

  norms = model.block.layers
  before = {"linear": value_of(model.linear.kernel), "head": value_of(model.head.bias),
            **{f"norm{i}": (value_of(n.scale), value_of(n.bias)) for i, n in enumerate(norms)}}
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, trainable))(model)
  optimizer.update(model, grads)
  assert np.abs(value_of(model.linear.kernel) - before["linear"]).max() > 0
  assert np.abs(value_of(model.head.bias) - before["head"]).max() > 0
  for i, norm in enumerate(norms):
    np.testing.assert_array_equal(value_of(norm.scale), before[f"norm{i}"][0])
    np.testing.assert_array_equal(value_of(norm.bias), before[f"norm{i}"][1])
  # Without the filter the same step moves them: the test can fail.
  plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  plain.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
  assert np.abs(value_of(norms[0].scale) - before["norm0"][0]).max() > 0
