"""Complex input, as Flax accepts it: a complex mean and the real variance E|x - mean|^2.

References are complex128 NumPy two-pass formulas; Flax's layers are the parity reference on
data near 0, and jaxnorm must stay right far from 0 (an offset of 1e4 in both parts).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn

OFFSETS = (0.0, (3 + 4j) * 1e4)
EPSILON = 1e-5


def complex_data(shape, offset=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape) + offset).astype(np.complex64)


def reference_moments(x, axes, where=None):
  """Mean and E|x - mean|^2 of the valid elements in complex128 (keepdims)."""
  x = np.asarray(x, np.complex128)
  valid = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  count = valid.sum(axis=axes, keepdims=True)
  mean = np.where(valid, x, 0).sum(axis=axes, keepdims=True) / count
  var = np.where(valid, np.abs(x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / count
  return mean, var, count


def reference_standardize(x, axes, where=None):
  mean, var, _ = reference_moments(x, axes, where)
  return (np.asarray(x, np.complex128) - mean) / np.sqrt(var + EPSILON)


def error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual, np.complex128) - expected)))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("masked", [False, True])
def test_moments_match_complex128_reference(offset, masked):
  x = complex_data((64, 3), offset)
  where = (np.arange(64) % 3 != 0)[:, None] if masked else None
  mean, var = jax.jit(lambda x: jaxnorm.moments(x, 0, where=where))(x)
  expected_mean, expected_var, _ = reference_moments(x, 0, where)
  assert mean.dtype == jnp.complex64 and var.dtype == jnp.float32
  assert error(mean, expected_mean[0]) < 1e-6 * (1 + abs(offset))
  assert error(var, expected_var[0]) < 1e-5  # var is about 2: far from zero as near it


@pytest.mark.parametrize("offset", OFFSETS)
def test_norm_functions_match_complex128_reference(offset):
  x = complex_data((4, 6, 8), offset)
  cases = {
      "layer_norm": (jaxnorm.layer_norm, reference_standardize(x, (-1,))),
      "group_norm": (lambda x: jaxnorm.group_norm(x, num_groups=2),
                     reference_standardize(x.reshape(4, 6, 2, 4), (1, 3)).reshape(x.shape)),
      "instance_norm": (jaxnorm.instance_norm, reference_standardize(x, (1,))),
      "batch_norm": (lambda x: jaxnorm.batch_norm(x, None, training=True)[0],
                     reference_standardize(x, (0, 1))),
  }
  for name, (function, expected) in cases.items():
    for run in (function, jax.jit(function)):
      y = run(x)
      assert y.dtype == jnp.complex64, name
      assert error(y, expected) < 2e-4, name  # float32 rounding of |x| ~ 5e4 is 4e-3


def test_rms_norm_uses_the_mean_of_abs_squared():
  x = complex_data((5, 16))
  x128 = np.asarray(x, np.complex128)
  expected = x128 / np.sqrt((np.abs(x128) ** 2).mean(-1, keepdims=True) + EPSILON)
  assert error(jaxnorm.rms_norm(x, epsilon=EPSILON), expected) < 1e-5


def test_batch_norm_running_mean_becomes_complex_and_running_var_stays_real():
  x = complex_data((32, 3), OFFSETS[1])
  _, running = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), training=True, momentum=0.9)
  mean, var, count = reference_moments(x, 0)
  assert running.mean.dtype == jnp.complex64 and running.var.dtype == jnp.float32
  assert error(running.mean, 0.1 * mean[0]) < 1e-6 * abs(OFFSETS[1])
  assert error(running.var, 0.9 + 0.1 * var[0] * 32 / 31) < 1e-5  # unbiased, as PyTorch


def test_gradients_match_a_plain_complex128_formula():
  """The real loss's gradient through layer_norm and batch_norm against a plain jnp formula."""
  x = complex_data((6, 5), OFFSETS[1]).astype(np.complex128)

  def plain(x, axes):
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.abs(x - mean) ** 2, axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPSILON)

  def loss(norm):
    return lambda x: jnp.sum(jnp.abs(norm(x) - target) ** 2)

  with jax.enable_x64(True):
    target = jnp.asarray(complex_data((6, 5), seed=1), jnp.complex128)
    for ours, axes in ((lambda x: jaxnorm.layer_norm(x, epsilon=EPSILON), (-1,)),
                       (lambda x: jaxnorm.batch_norm(x, None, training=True)[0], (0,))):
      grad = jax.jit(jax.grad(loss(ours)))(jnp.asarray(x))  # jit: one compile, not one a primitive
      expected = jax.jit(jax.grad(loss(lambda x: plain(x, axes))))(jnp.asarray(x))
      assert grad.dtype == jnp.complex128
      np.testing.assert_allclose(grad, expected, rtol=1e-7, atol=1e-9)


def test_fast_xla_paths_give_the_reference_values_on_complex_input():
  """Near 0 the XLA path would take plain sums of x and x*x; complex input must not."""
  x = complex_data((8, 4096))  # also long enough rows for the fused CPU row kernels
  functions = (jaxnorm.layer_norm, jaxnorm.rms_norm, lambda x: jaxnorm.moments(x, 0),
               lambda x: jaxnorm.batch_norm(x, None, training=True)[0])
  for function in functions:
    with jaxnorm.kernels("reference"):
      expected = jax.jit(function)(x)
    with jaxnorm.kernels("xla"):
      actual = jax.jit(function)(x)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                 actual, expected)


def test_statistics_pool_across_devices_with_complex_moments():
  x = complex_data((4, 8, 3), OFFSETS[1])
  where = complex_data((4, 8, 1), seed=2).real > -0.5
  mean, var = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"),
                       axis_name="d")(x, where)
  expected_mean, expected_var, _ = reference_moments(x, (0, 1), where)
  assert error(mean[0], expected_mean[0, 0]) < 1e-6 * abs(OFFSETS[1])
  assert error(var[0], expected_var[0, 0]) < 1e-5


@pytest.mark.parametrize("make", [
    lambda: (jl.BatchNorm(use_running_average=False, momentum=0.9),
             nn.BatchNorm(use_running_average=False, momentum=0.9)),
    lambda: (jl.LayerNorm(), nn.LayerNorm()),
    lambda: (jl.RMSNorm(), nn.RMSNorm()),
    lambda: (jl.GroupNorm(num_groups=2), nn.GroupNorm(num_groups=2)),
], ids=["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"])
def test_linen_layers_match_flax_on_complex_input_near_zero(make):
  ours, theirs = make()
  x = complex_data((16, 4))
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(theirs.init(jax.random.key(0), x))
  y, updates = ours.apply(variables, x, mutable=["batch_stats"])
  expected, their_updates = theirs.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == expected.dtype == jnp.complex64
  np.testing.assert_allclose(y, expected, atol=5e-6)
  if updates:  # the running mean moves the same way; the variance is unbiased, as PyTorch's
    np.testing.assert_allclose(updates["batch_stats"]["mean"],
                               their_updates["batch_stats"]["mean"], atol=1e-7)
    _, var, _ = reference_moments(x, 0)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var[0] * 16 / 15,
                               rtol=1e-6)


def test_linen_batch_norm_stays_right_far_from_zero_where_flax_does_not():
  x = complex_data((16, 4), OFFSETS[1])
  expected = reference_standardize(x, (0,))
  ours = jl.BatchNorm(use_running_average=False)
  y, _ = ours.apply(ours.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert error(y, expected) < 1e-3
  theirs = nn.BatchNorm(use_running_average=False)
  flax_y, _ = theirs.apply(theirs.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert error(flax_y, expected) > 0.1  # E|x|^2 - |E x|^2 cancels at |x| ~ 5e4


def test_nnx_layers_match_flax_and_keep_a_complex_running_mean():
  x = complex_data((16, 4))
  for ours, theirs in ((jn.LayerNorm(4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0))),
                       (jn.RMSNorm(4, rngs=nnx.Rngs(0)), nnx.RMSNorm(4, rngs=nnx.Rngs(0)))):
    np.testing.assert_allclose(ours(x), theirs(x), atol=5e-6)
  layer = jn.BatchNorm(4, use_running_average=False, momentum=0.9, rngs=nnx.Rngs(0))
  y = nnx.jit(lambda layer, x: layer(x))(layer, x)
  np.testing.assert_allclose(y, reference_standardize(x, (0,)), atol=5e-6)
  # flax.nnx writes the mean into its float32 array and drops the imaginary part; jaxnorm keeps it
  mean, _, _ = reference_moments(x, 0)
  assert layer.mean[...].dtype == jnp.complex64
  np.testing.assert_allclose(layer.mean[...], 0.1 * mean[0], atol=1e-7)


def test_norms_without_a_complex_meaning_still_reject_it_with_the_fix():
  x = complex_data((8, 4))
  with pytest.raises(TypeError, match="floating-point input.*cast it first"):
    jaxnorm.batch_renorm(x, jaxnorm.init_renorm_stats(4), training=True)
  with pytest.raises(TypeError, match="floating-point input"):
    jl.BatchRenorm(use_running_average=False).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=r"floating-point input \(or complex\)"):
    jaxnorm.layer_norm(np.arange(8))
