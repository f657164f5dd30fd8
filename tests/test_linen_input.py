"""jaxnorm.linen.Standardize, MinMaxScale and RobustScale: constants in 'input_stats', not in
params, no gradient, kept by orbax checkpoints, the same numbers as the pure scalers. (The wine
example's quick run is part of the demo's, tests/test_examples_studies.py.)"""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx


def data(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((64, 4)) * [1, 10, 100, 0] + [0, 5, 1e3, 2]).astype(np.float32)


LAYERS = {
    "Standardize": (lambda s: jnn.Standardize(stats=s), jaxnorm.standardize, ("mean", "std")),
    "MinMaxScale": (lambda s: jnn.MinMaxScale(stats=s, feature_range=(-1, 1), clip=True),
                    lambda x, s: jaxnorm.minmax(x, s, feature_range=(-1, 1), clip=True),
                    ("max", "min")),
    "RobustScale": (lambda s: jnn.RobustScale(stats=s, quantile_range=(10, 90)),
                    lambda x, s: jaxnorm.robust(x, s, quantile_range=(10, 90)),
                    ("median", "q_high", "q_low")),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("use_jit", [False, True])
def test_layer_equals_scaler_and_holds_constants_outside_params(name, use_jit):
  make, scaler, variable_names = LAYERS[name]
  x = data()
  stats = jaxnorm.fit_stats(x)
  layer = make(stats)
  variables = layer.init(jax.random.key(0), x[:1])
  assert set(variables) == {"input_stats"}
  assert sorted(variables["input_stats"]) == sorted(variable_names)
  assert all(v.dtype == jnp.float32 for v in variables["input_stats"].values())
  apply = jax.jit(layer.apply) if use_jit else layer.apply
  y = apply(variables, x)  # no mutable= needed
  np.testing.assert_allclose(y, scaler(x, stats), rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(y))


def test_spread_in_the_statistics_precision_under_x64():
  """Under x64 the variables are float64, so max - min of data far from zero is exact."""
  x = np.array([[1e8], [1e8 + 1], [1e8 + 2], [1e8 + 3]])
  with jax.enable_x64(True):
    stats = jaxnorm.fit_stats(x)
    q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75], axis=0)
    cases = ((jnn.MinMaxScale(stats=stats), (x - x.min(0)) / (x.max(0) - x.min(0))),
             (jnn.RobustScale(stats=stats), (x - median) / (q75 - q25)))
    for layer, expected in cases:
      y, variables = layer.init_with_output(jax.random.key(0), x)
      assert all(v.dtype == jnp.float64 for v in variables["input_stats"].values())
      assert y.dtype == jnp.float64
      np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), expected, atol=1e-12)
    for layer, (_, expected) in zip((jnnx.MinMaxScale(stats), jnnx.RobustScale(stats)), cases):
      assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(nnx.state(layer)))  # NNX too
      np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_uint8_images_in_float_out():
  images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  stats = jaxnorm.fit_stats(images)
  y, _ = jnn.Standardize(stats=stats).init_with_output(jax.random.key(0), images)
  assert y.dtype == jnp.float32
  pixels = images.astype(np.float64).reshape(-1, 3)
  expected = (images.astype(np.float64) - pixels.mean(0)) / pixels.std(0)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


class Model(nn.Module):
  stats: jaxnorm.Stats | None = None

  @nn.compact
  def __call__(self, x):
    x = jnn.Standardize(stats=self.stats, channel_axis=-1)(x)
    return nn.Dense(2)(x)


def test_no_gradient_reaches_the_statistics():
  x = data(2)
  model = Model(stats=jaxnorm.fit_stats(x))
  variables = model.init(jax.random.key(0), x)
  assert "input_stats" not in variables["params"]

  def loss(variables):
    return jnp.sum(model.apply(variables, x) ** 2)

  grads = jax.grad(loss)(variables)  # even differentiating every collection
  for leaf in jax.tree.leaves(grads["input_stats"]):
    np.testing.assert_array_equal(leaf, 0)
  assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads["params"]))
  input_grad = jax.grad(lambda v: jnp.sum(model.apply(variables, v)))(jnp.asarray(x))
  assert np.all(np.isfinite(input_grad))


def test_orbax_checkpoint_keeps_the_statistics(tmp_path):
  import orbax.checkpoint as ocp
  x = data(3)
  model = Model(stats=jaxnorm.fit_stats(x))
  variables = model.init(jax.random.key(0), x)
  expected = model.apply(variables, x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "checkpoint", variables)
  checkpointer.wait_until_finished()
  # A model rebuilt without statistics restores them from the checkpoint.
  restored = checkpointer.restore(tmp_path / "checkpoint")
  np.testing.assert_array_equal(restored["input_stats"]["Standardize_0"]["mean"],
                                variables["input_stats"]["Standardize_0"]["mean"])
  np.testing.assert_allclose(Model().apply(restored, x), expected, rtol=1e-6)


def test_init_without_statistics_says_how_to_fix_it():
  with pytest.raises(ValueError, match=r"needs fitted statistics.*stats=jaxnorm.fit_stats"):
    jnn.Standardize().init(jax.random.key(0), data())


def test_channel_axis_from_the_statistics():
  x = np.random.default_rng(4).standard_normal((2, 3, 4, 4)) * [[[[1]], [[10]], [[100]]]]
  stats = jaxnorm.fit_stats(x, channel_axis=1)
  y, variables = jnn.Standardize(stats=stats).init_with_output(jax.random.key(0), x)
  np.testing.assert_allclose(y, jaxnorm.standardize(x, stats), rtol=1e-6)
  restored = jnn.Standardize(channel_axis=1).apply(variables, x)
  np.testing.assert_allclose(restored, y, rtol=1e-6)
