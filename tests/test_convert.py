"""Converting models written with flax norms: ``use_jaxnorm`` (Linen), ``convert`` (NNX).

A ResNet-style model written as model zoos write it (flax's examples/imagenet layout: stem conv
and batch norm, basic blocks with and without a projection, zero-initialized last scale; one
block a stage, small widths and images, to keep the compiles short) is run by flax and,
converted, by jaxnorm. Near zero, outputs, gradients and updated ``batch_stats`` equal flax's.
Far from zero (input offset 1e4) flax's batch statistics are wrong; jaxnorm's output equals the
exact one, which a train-mode batch norm's invariance to per-channel offsets gives: the stem
conv (padding 'VALID') maps the offset to a constant per channel, which its batch norm removes,
so the exact output is the model's output on the same float32 input minus 1e4 (exact by
Sterbenz's lemma), data near zero where float32 is right.
"""
import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from tests import reference

OFFSET = 1e4
STAGES, WIDTHS = (1, 1, 1, 1), (4, 8, 8, 16)  # ResNet-18 has (2, 2, 2, 2)


def filled(path, leaf):
  """A deterministic value for a variable of this name and shape (compiling flax's random
  initializers costs more than the whole test)."""
  keys = [getattr(key, "key", getattr(key, "name", None)) for key in path]
  name = [key for key in keys if key != "value"][-1]  # nnx states end in .value
  shape = leaf.shape
  if name == "kernel":
    rng = np.random.default_rng(zlib.crc32(jax.tree_util.keystr(path).encode()))
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), leaf.dtype)
  return (jnp.ones if name in ("scale", "var") else jnp.zeros)(shape, leaf.dtype)


def images(offset=0.0, seed=0):
  x = np.random.default_rng(seed).normal(size=(4, 10, 10, 3)).astype(np.float32)
  return jnp.asarray(x + np.float32(offset))  # rounded to float32, as a user's data would be


class BasicBlock(nn.Module):
  """flax examples/imagenet ``ResNetBlock``: conv, norm, act, conv, norm, projection."""
  filters: int
  conv: type
  norm: type
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    x = conv(WIDTHS[0], (3, 3), padding="VALID", name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, blocks in enumerate(STAGES):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = BasicBlock(WIDTHS[i], conv=conv, norm=norm, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def linen_loss(variables, x, labels, jaxnorm_math):
  def run():
    logits, updates = ResNet().apply(variables, x, mutable=["batch_stats"])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return loss, (logits, updates["batch_stats"])
  if jaxnorm_math:
    with jnn.use_jaxnorm():
      return run()
  return run()


linen_step = jax.jit(jax.value_and_grad(linen_loss, has_aux=True), static_argnums=3)
LABELS = jnp.array([0, 1, 2, 3])


@pytest.fixture(scope="module")
def linen_variables():
  x = images()
  shapes = jax.eval_shape(ResNet().init, jax.random.key(0), x)
  with jnn.use_jaxnorm():
    converted = jax.eval_shape(ResNet().init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(converted)
  assert jax.tree.leaves(shapes) == jax.tree.leaves(converted)  # shapes and dtypes
  return jax.tree_util.tree_map_with_path(filled, shapes)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm"])
def test_linen_init_gives_flax_tree(name):
  layer = getattr(nn, name)(**({"num_groups": 2} if name == "GroupNorm" else {}),
                            **({"use_running_average": False} if name == "BatchNorm" else {}))
  x = images()[:, :2, :2, :2]
  with jnn.use_jaxnorm():
    converted = layer.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, converted, layer.init(jax.random.key(0), x))


def assert_trees_close(actual, expected, rtol, atol):
  """Close leaf by leaf; ``atol`` is relative to each leaf's largest value."""
  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * float(np.abs(b).max()))
  jax.tree.map(close, actual, expected)


def test_linen_resnet_equals_flax_near_zero(linen_variables):
  x = images()
  (loss, (logits, stats)), grads = linen_step(linen_variables, x, LABELS, True)
  (flax_loss, (flax_logits, flax_stats)), flax_grads = linen_step(linen_variables, x, LABELS,
                                                                  False)
  np.testing.assert_allclose(logits, flax_logits, rtol=1e-4, atol=1e-5)
  assert_trees_close(grads, flax_grads, rtol=1e-3, atol=1e-4)
  assert_trees_close(stats, flax_stats, rtol=1e-5, atol=1e-5)  # biased rule, as flax's


def test_linen_resnet_right_far_from_zero(linen_variables):
  far = images(OFFSET)
  exact_input = far - np.float32(OFFSET)  # exact in float32
  (_, (exact, _)), _ = linen_step(linen_variables, exact_input, LABELS, False)
  (_, (ours, stats)), _ = linen_step(linen_variables, far, LABELS, True)
  (_, (theirs, _)), _ = linen_step(linen_variables, far, LABELS, False)
  ours_error = reference.max_error(ours, exact) / float(jnp.std(exact))
  theirs_error = reference.max_error(theirs, exact) / float(jnp.std(exact))
  # The float32 stem conv rounds its output at 1e4 to ~1e-3 (for flax and jaxnorm alike), which
  # the layers after it amplify to 1e-2 to 6e-2 (by the weights); flax's E[x²] - E[x]² is
  # off by the output's whole spread.
  assert ours_error < 0.1, ours_error
  assert not theirs_error < 0.5, theirs_error
  assert all(bool(jnp.isfinite(s).all()) for s in jax.tree.leaves(stats))


class ExtraOption(nn.BatchNorm):
  """A flax BatchNorm with an option jaxnorm's BatchNorm does not have."""
  unknown_option: bool = False


def test_linen_option_jaxnorm_cannot_honour_raises():
  x = images()
  layer = ExtraOption(use_running_average=False, unknown_option=True)
  with jnn.use_jaxnorm(), pytest.raises(NotImplementedError, match="unknown_option=True"):
    layer.init(jax.random.key(0), x)
  far = images(OFFSET)
  with jnn.use_jaxnorm():  # at its default the option changes nothing: converted, right far
    y, _ = ExtraOption(use_running_average=False).init_with_output(jax.random.key(0), far)
  exact, _ = nn.BatchNorm(use_running_average=False).init_with_output(
      jax.random.key(0), far - np.float32(OFFSET))
  np.testing.assert_allclose(y, exact, atol=2e-2)


@pytest.mark.parametrize("name, kwargs", [
    ("LayerNorm", {}), ("RMSNorm", {}), ("GroupNorm", {"num_groups": 2}),
    ("InstanceNorm", {})])
def test_linen_other_norms_equal_flax_and_right_far(name, kwargs):
  layer = getattr(nn, name)(**kwargs)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32))
  variables = layer.init(jax.random.key(0), x)
  with jnn.use_jaxnorm():
    ours = layer.apply(variables, x)
    far = layer.apply(variables, x + np.float32(OFFSET) * (name != "RMSNorm"))
  np.testing.assert_allclose(ours, layer.apply(variables, x), rtol=1e-5, atol=1e-5)
  if name != "RMSNorm":  # RMSNorm has no mean to be far from
    np.testing.assert_allclose(far, ours, atol=5e-3)


# NNX: the same model as flax.nnx zoo code writes it.


class NNXBlock(nnx.Module):
  def __init__(self, cin, cout, strides, rngs):
    conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)
    norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.conv1, self.bn1 = conv(cin, cout, (3, 3), strides), norm(cout)
    self.conv2 = conv(cout, cout, (3, 3))
    self.bn2 = norm(cout, scale_init=nnx.initializers.zeros_init())
    projected = cin != cout or strides != (1, 1)
    self.proj = (nnx.Sequential(conv(cin, cout, (1, 1), strides), norm(cout)) if projected
                 else None)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu((x if self.proj is None else self.proj(x)) + y)


class NNXResNet(nnx.Module):
  def __init__(self, rngs, num_classes=5):
    self.conv_init = nnx.Conv(3, WIDTHS[0], (3, 3), padding="VALID", use_bias=False, rngs=rngs)
    self.bn_init = nnx.BatchNorm(WIDTHS[0], momentum=0.9, rngs=rngs)
    blocks, cin = [], WIDTHS[0]
    for i, count in enumerate(STAGES):
      for j in range(count):
        blocks.append(NNXBlock(cin, WIDTHS[i], (2, 2) if i > 0 and j == 0 else (1, 1), rngs))
        cin = WIDTHS[i]
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_init(self.conv_init(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


@nnx.jit
def nnx_step(model, x):
  """One training forward and backward: (logits, grads); the model's BatchStats update."""
  def loss(model):
    logits = model(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), LABELS[:, None], 1)), logits
  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


def batch_stats(model):
  return nnx.state(model, nnx.BatchStat)


def test_nnx_convert_resnet_equals_flax_and_right_far():
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: NNXResNet(nnx.Rngs(0))))
  flax_model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(filled, shapes))
  model = jnnx.convert(nnx.clone(flax_model))
  assert not any(isinstance(m, (nnx.BatchNorm,)) for _, m in nnx.iter_graph(model))
  assert isinstance(model.blocks[2].proj.layers[1], jnnx.BatchNorm)
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(flax_model))
  x = images()
  logits, grads = nnx_step(model, x)
  flax_logits, flax_grads = nnx_step(flax_model, x)
  np.testing.assert_allclose(logits, flax_logits, rtol=1e-4, atol=1e-5)
  assert_trees_close(grads, flax_grads, rtol=1e-3, atol=1e-4)
  assert_trees_close(batch_stats(model), batch_stats(flax_model), rtol=1e-5, atol=1e-5)
  far = images(OFFSET)
  exact, _ = nnx_step(nnx.clone(flax_model), far - np.float32(OFFSET))
  ours, _ = nnx_step(model, far)
  theirs, _ = nnx_step(flax_model, far)
  scale = float(jnp.std(exact))
  assert reference.max_error(ours, exact) / scale < 0.1
  assert not reference.max_error(theirs, exact) / scale < 0.5


def test_nnx_convert_keeps_variables_sharing_and_other_norms():
  rngs = nnx.Rngs(0)
  shared = nnx.LayerNorm(4, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self):
      self.a, self.b = shared, shared
      self.norms = nnx.data([nnx.RMSNorm(4, rngs=rngs), nnx.GroupNorm(4, num_groups=2,
                                                                       rngs=rngs)])
      self.by_name = nnx.Dict({"inst": nnx.InstanceNorm(4, rngs=rngs)})

  model = Model()
  scale = model.a.scale
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32))
  expected = [model.a(x), model.norms[0](x), model.norms[1](x), model.by_name["inst"](x)]
  assert jnnx.convert(model) is model
  assert isinstance(model.a, jnnx.LayerNorm) and model.a is model.b and model.a.scale is scale
  assert isinstance(model.norms[1], jnnx.GroupNorm) and model.norms[1].num_groups == 2
  assert isinstance(model.by_name["inst"], jnnx.InstanceNorm)
  got = [model.a(x), model.norms[0](x), model.norms[1](x), model.by_name["inst"](x)]
  for ours, theirs in zip(got, expected):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_nnx_convert_validates_everything_first():
  rngs = nnx.Rngs(0)
  custom = nnx.LayerNorm(4, promote_dtype=lambda args, dtype=None: args, rngs=rngs)
  model = nnx.Sequential(nnx.BatchNorm(4, rngs=rngs), custom)
  with pytest.raises(NotImplementedError, match="promote_dtype"):
    jnnx.convert(model)
  assert type(model.layers[0]) is nnx.BatchNorm  # nothing half-converted
  held_in_tuple = nnx.Sequential(nnx.Linear(2, 4, rngs=rngs))
  held_in_tuple.pair = nnx.data((nnx.BatchNorm(4, rngs=rngs),))
  with pytest.raises(ValueError, match="tuple"):
    jnnx.convert(held_in_tuple)
  with pytest.raises(ValueError, match="no flax.nnx norm"):
    jnnx.convert(nnx.Sequential(nnx.Linear(2, 4, rngs=rngs)))


def test_biased_running_var_option():
  """unbiased_running_var=False stores flax's biased batch variance: batch of 2, var 4 -> 2."""
  x = jnp.array([[1.0], [5.0]])
  flax_layer = nnx.BatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0))
  ours = jnnx.BatchNorm(1, momentum=0.0, unbiased_running_var=False)
  torch_rule = jnnx.BatchNorm(1, momentum=0.0)
  for layer in (flax_layer, ours, torch_rule):
    layer(x)
  assert float(flax_layer.var[...][0]) == float(ours.var[...][0]) == 4.0
  assert float(torch_rule.var[...][0]) == 8.0
  linen = jnn.BatchNorm(use_running_average=False, momentum=0.0, unbiased_running_var=False)
  _, updates = linen.apply(linen.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert float(updates["batch_stats"]["var"][0]) == 4.0
  with pytest.raises(ValueError, match="BatchNorm's option only"):
    jnnx.GhostBatchNorm(1, unbiased_running_var=False)
