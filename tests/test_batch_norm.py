"""jaxnorm.batch_norm: training and evaluation, running statistics, bad batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from tests import reference


def data(shape, offset=0.0, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * 3 + offset).astype(np.float32)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_training_output_and_running_update_match_reference(use_jit, masked):
  rng = np.random.default_rng(1)
  x = data((6, 5, 4), 20.0)
  where = rng.random((6, 5, 1)) < 0.6 if masked else None
  scale, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  running = jaxnorm.BatchStats(jnp.arange(4.0), jnp.full(4, 2.0))
  fn = functools.partial(jaxnorm.batch_norm, training=True, momentum=0.9, epsilon=1e-5)
  y, new = (jax.jit(fn) if use_jit else fn)(x, running, scale, bias, where=where)
  mean, var, count = reference.moments(x, (0, 1), where)
  ref = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-5
  unbiased = var * count / (count - 1)
  np.testing.assert_allclose(new.mean, 0.9 * np.arange(4) + 0.1 * mean.ravel(), rtol=1e-6)
  np.testing.assert_allclose(new.var, 0.9 * 2 + 0.1 * unbiased.ravel(), rtol=1e-5)


def test_evaluation_uses_running_statistics_unchanged():
  x = data((5, 3))
  running = jaxnorm.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
  y, same = jaxnorm.batch_norm(x, running, training=False, epsilon=0.0)
  np.testing.assert_allclose(y, (x - [1, 2, 3]) / np.sqrt([4, 5, 6]), rtol=1e-6)
  assert same is running


def test_feature_axis_can_be_any_axis():
  x = data((4, 3, 5), 7.0)
  y, new = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), training=True, axis=1,
                              epsilon=0.0)
  assert reference.max_error(y, reference.standardize(x, (0, 2))) < 1e-5
  assert new.mean.shape == (3,)
  y, new = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats((3, 5)), training=True, axis=(1, 2),
                              epsilon=0.0)
  assert reference.max_error(y, reference.standardize(x, (0,))) < 1e-4
  assert new.var.shape == (3, 5)


def test_non_finite_batch_leaves_running_statistics_unchanged_per_channel():
  x = data((8, 3))
  x[2, 1] = np.nan
  x[5, 2] = np.inf
  running = jaxnorm.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
  y, new = jaxnorm.batch_norm(x, running, training=True, momentum=0.5)
  assert np.isnan(y[:, 1]).all()                       # the output still shows the NaN
  np.testing.assert_array_equal(new.mean[1:], [2.0, 3.0])
  np.testing.assert_array_equal(new.var[1:], [5.0, 6.0])
  np.testing.assert_allclose(new.mean[0], 0.5 + 0.5 * x[:, 0].astype(np.float64).mean(), rtol=1e-6)


def test_fully_masked_batch_leaves_running_statistics_unchanged():
  x = data((4, 2))
  running = jaxnorm.BatchStats(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
  y, new = jaxnorm.batch_norm(x, running, training=True, where=np.zeros((4, 1), bool))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(new.mean, running.mean)
  np.testing.assert_array_equal(new.var, running.var)
  # one valid value: a mean but no variance, so the channel is left alone too
  where = np.zeros((4, 1), bool)
  where[0] = True
  _, new = jaxnorm.batch_norm(x, running, training=True, where=where)
  np.testing.assert_array_equal(new.var, running.var)


def test_batch_of_one_in_training_is_an_error_naming_the_fix():
  with pytest.raises(ValueError, match="at least 2 values per channel.*use_running_average"):
    jaxnorm.batch_norm(jnp.ones((1, 4)), jaxnorm.init_batch_stats(4), training=True)
  # evaluation with one example is fine
  jaxnorm.batch_norm(jnp.ones((1, 4)), jaxnorm.init_batch_stats(4), training=False)


def test_stateless_batch_statistics_without_running_state():
  x = data((6, 2), 4.0)
  y, none = jaxnorm.batch_norm(x, None, training=True, epsilon=0.0)
  assert none is None
  assert reference.max_error(y, reference.standardize(x, (0,))) < 1e-5
  with pytest.raises(ValueError, match="running"):
    jaxnorm.batch_norm(x, None, training=False)


def test_momentum_matches_flax_semantics():
  import flax.linen as nn
  x = data((16, 3), 2.0)
  variables = nn.BatchNorm(use_running_average=False, momentum=0.8).init(jax.random.key(0), x)
  _, updates = nn.BatchNorm(use_running_average=False, momentum=0.8).apply(
      variables, x, mutable=["batch_stats"])
  _, new = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), training=True, momentum=0.8)
  np.testing.assert_allclose(new.mean, updates["batch_stats"]["mean"], rtol=1e-5)
  # Flax averages the biased variance; jaxnorm the unbiased one (n / (n - 1) more).
  flax_var = updates["batch_stats"]["var"]
  batch_var = (flax_var - 0.8) / 0.2
  np.testing.assert_allclose(new.var, 0.8 + 0.2 * batch_var * 16 / 15, rtol=1e-5)


def test_jit_grad_vmap_compose():
  x = data((4, 6, 3), 1.0)
  scale = jnp.ones(3)

  def loss(scale, x):
    y, _ = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), scale, training=True)
    return jnp.sum(y ** 3)

  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(scale, x)
  per_example = jax.jit(jax.grad(loss))  # one compile for the four examples
  for i in range(4):
    np.testing.assert_allclose(grads[i], per_example(scale, x[i]), rtol=1e-4, atol=1e-5)
