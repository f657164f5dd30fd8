"""jaxnorm.moments: masked, stable, float32-or-wider, differentiable, pooled across devices."""
import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxnorm
from tests import reference


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


@st.composite
def case(draw):
  """A shape, a non-empty set of axes, and a mask that broadcasts (or None)."""
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
  ndim = len(shape)
  axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1, max_size=ndim))))
  mask_shape = tuple(draw(st.sampled_from([s, 1])) for s in shape)
  use_mask = draw(st.booleans())
  seed = draw(st.integers(0, 2**31 - 1))
  offset = draw(st.sampled_from([0.0, 1e3, 1e5]))
  return shape, axes, (mask_shape if use_mask else None), seed, offset


@pytest.mark.parametrize("use_jit", [False, True])
@given(case())
def test_moments_match_float64_reference(use_jit, args):
  shape, axes, mask_shape, seed, offset = args
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
  where = None if mask_shape is None else rng.random(mask_shape) < 0.6
  fn = maybe_jit(functools.partial(jaxnorm.moments, axes=axes, keepdims=True), use_jit)
  mean, var = fn(x, where=where)
  ref_mean, ref_var, count = reference.moments(x, axes, where)
  assert mean.dtype == var.dtype == jnp.float32
  assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
  # Mean: float32 rounding of the value itself; variance: about 1e-6 of the spread.
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(var)[count == 0], 0)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e5, 1e6])
def test_variance_accurate_far_from_zero(offset):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((4096, 8)) + offset).astype(np.float32)
  mean, var = jax.jit(jaxnorm.moments, static_argnums=1)(x, 0)
  ref_mean, ref_var, _ = reference.moments(x, 0)
  np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-5)
  np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-7, atol=1e-6)


def test_half_precision_input_is_reduced_in_float32():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((512, 4)) + 300).astype(jnp.bfloat16)
  mean, var = jaxnorm.moments(x, 0)
  assert mean.dtype == jnp.float32
  ref_mean, ref_var, _ = reference.moments(np.asarray(x, np.float32), 0)
  np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-5)
  np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-6)


def test_float64_stays_float64():
  with jax.enable_x64(True):
    x = np.random.default_rng(2).standard_normal((64, 3)) + 1e9
    mean, var = jaxnorm.moments(jnp.asarray(x, jnp.float64), 0)
    assert mean.dtype == jnp.float64
    np.testing.assert_allclose(var, x.var(0), rtol=1e-9)


def test_integer_input_gives_float_statistics():
  x = np.array([[0, 255], [255, 255]], np.uint8)
  mean, var = jaxnorm.moments(x, 0)
  np.testing.assert_allclose(mean, [127.5, 255])
  np.testing.assert_allclose(var, [127.5**2, 0])


def test_fully_masked_reduction_gives_zeros_not_nan():
  x = jnp.ones((3, 2))
  where = jnp.array([[True], [True], [True]]) & jnp.array([False, True])
  mean, var = jaxnorm.moments(x, 0, where=where)
  np.testing.assert_array_equal(mean, [0.0, 1.0])
  np.testing.assert_array_equal(var, [0.0, 0.0])
  grad = jax.grad(lambda x: jnp.sum(sum(jaxnorm.moments(x, 0, where=where))))(x)
  assert np.all(np.isfinite(grad))


def test_second_order_gradients_match_finite_differences_float64():
  """Second derivatives of masked moments; first ones: the float64 check_grads test below.

  In float64, where finite differences agree with them to within 1e-9 (in float32 this check
  needed a tolerance of 5e-2). Float32 gradients are checked against the float64 analytic
  derivative in test_gradient_equals_float64_analytic.
  """
  rng = np.random.default_rng(3)
  x = rng.standard_normal((5, 3)) + 10
  where = jnp.asarray(rng.random((5, 3)) < 0.7)
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)

    def f(x):
      mean, var = jaxnorm.moments(x, 0, where=where)
      return mean * 2 + var

    # jit: one compile for each derivative, where eager dispatch compiles every primitive
    check_grads(jax.jit(f), (x,), order=2, modes=["fwd", "rev"], atol=1e-8, rtol=1e-8)


def test_gradient_equals_float64_analytic():
  """d var / d x_i = 2 (x_i - mean) / n over the valid elements, 0 elsewhere."""
  rng = np.random.default_rng(4)
  x = (rng.standard_normal(50) + 1e4).astype(np.float32)
  where = rng.random(50) < 0.5
  grad = jax.grad(lambda x: jaxnorm.moments(x, 0, where=where)[1])(x)
  x64 = x.astype(np.float64)
  mean = x64[where].mean()
  expected = np.where(where, 2 * (x64 - mean) / where.sum(), 0)
  np.testing.assert_allclose(grad, expected, atol=1e-5)


def pooled_under_vmap(x, where, devices):
  """moments pooled over ``devices`` mapped slices of x with jax.vmap(axis_name=)."""
  xs = x.reshape(devices, -1, *x.shape[1:])
  ws = where.reshape(devices, -1, *where.shape[1:])
  fn = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"), axis_name="d")
  mean, var = fn(xs, ws)
  return mean, var


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_vmap_axis_name_pools_unequal_masks_by_count(offset):
  rng = np.random.default_rng(5)
  x = (rng.standard_normal((32, 3)) + offset).astype(np.float32)
  where = np.zeros((32, 1), bool)
  where[0:8] = True       # device 0: 8 valid rows
  where[8:9] = True       # device 1: 1
  where[16:17] = True     # device 2: 1; device 3: none
  mean, var = pooled_under_vmap(x, where, 4)
  ref_mean, ref_var, _ = reference.moments(x, 0, where)
  for d in range(4):  # every device sees the same pooled statistics
    np.testing.assert_allclose(mean[d], ref_mean.ravel(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var[d], ref_var.ravel(), rtol=1e-4, atol=1e-5)


def test_vmap_axis_name_all_devices_empty_is_not_nan():
  x = jnp.ones((8, 2))
  mean, var = pooled_under_vmap(x, np.zeros((8, 1), bool), 4)
  np.testing.assert_array_equal(mean, 0)
  np.testing.assert_array_equal(var, 0)


def test_axis_index_groups_pool_within_groups():
  x = np.arange(8, dtype=np.float32).reshape(4, 2, 1)  # device d holds rows 2d, 2d+1
  fn = jax.pmap(lambda x: jaxnorm.moments(x, 0, axis_name="d", axis_index_groups=[[0, 1], [2, 3]]),
                axis_name="d", devices=jax.devices()[:4])
  mean, var = fn(x)
  np.testing.assert_allclose(mean.ravel(), [1.5, 1.5, 5.5, 5.5])
  np.testing.assert_allclose(var.ravel(), [1.25, 1.25, 1.25, 1.25])


def test_pooled_input_gradient_equals_full_batch_gradient():
  rng = np.random.default_rng(6)
  x = (rng.standard_normal((16, 3)) + 100).astype(np.float32)
  where = rng.random((16, 1)) < 0.6
  weights = rng.standard_normal((2, 3)).astype(np.float32)

  def loss_full(x):
    mean, var = jaxnorm.moments(x, 0, where=where)
    return jnp.sum(weights[0] * mean + weights[1] * var)

  def loss_pooled(xs):
    mean, var = jax.vmap(lambda x, w: jaxnorm.moments(x, 0, where=w, axis_name="d"),
                         axis_name="d")(xs, where.reshape(4, 4, 1))
    return jnp.sum(weights[0] * mean[0] + weights[1] * var[0])

  full = jax.grad(loss_full)(x)
  pooled = jax.grad(loss_pooled)(x.reshape(4, 4, 3)).reshape(16, 3)
  np.testing.assert_allclose(pooled, full, atol=1e-5)


DTYPES = ["float32", "bfloat16", "float16", "float64"]


@given(case(), st.sampled_from(DTYPES))
def test_moments_every_dtype_match_float64_reference(args, dtype):
  """Half precision is reduced in float32, float64 (with x64 enabled) stays float64."""
  shape, axes, mask_shape, seed, offset = args
  if dtype == "float16":
    offset = min(offset, 1e3)  # float16 tops out at 65504
  rng = np.random.default_rng(seed)
  where = None if mask_shape is None else rng.random(mask_shape) < 0.6
  with jax.enable_x64(dtype == "float64"):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + offset, dtype)
    mean, var = jax.jit(functools.partial(jaxnorm.moments, axes=axes, keepdims=True))(
        x, where=where)
    expected_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    assert mean.dtype == var.dtype == expected_dtype
    ref_mean, ref_var, _ = reference.moments(np.asarray(x.astype(expected_dtype)), axes, where)
  tight = dtype == "float64"
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-12 if tight else 1e-6,
                             atol=1e-9 if tight else 1e-5)
  # the variance of the rounded values, to float32 accuracy relative to the spread
  spread = np.maximum(ref_var, 1.0)
  assert np.all(np.abs(np.asarray(var, np.float64) - ref_var) <= (1e-10 if tight else 2e-4)
                * spread)


@settings(max_examples=6)
@given(case())
def test_moments_check_grads_float64_with_and_without_mask(args):
  """Reverse- and forward-mode derivatives of mean and variance against finite differences.

  Random shapes, axes and masks; the second-order test above checks both orders again on a
  fixed masked case (each example here compiles three programs)."""
  shape, axes, mask_shape, seed, _ = args
  rng = np.random.default_rng(seed)
  where = None if mask_shape is None else rng.random(mask_shape) < 0.6
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 3, jnp.float64)
    weights = jnp.asarray(rng.standard_normal((2,) + shape), jnp.float64)

    def f(x):
      mean, var = jaxnorm.moments(x, axes, where=where, keepdims=True)
      return jnp.sum(weights[0] * mean) + jnp.sum(weights[1] * var)

    check_grads(jax.jit(f), (x,), order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,axes", [((7, 300), (1,)), ((3, 5, 4, 16), (2, 3))])
def test_fused_row_moments_against_float64_values_and_gradients(shape, axes, offset):
  """The corrected two-pass moments: float64-accurate far from 0, differentiable as written."""
  from jaxnorm._src.fast import xla as stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  x = (rng.standard_normal(shape) * 3 + offset).astype(np.float32)
  moments = jax.jit(stats.fused_row_moments, static_argnums=1)(jnp.asarray(x), axes)
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
  spacing = np.spacing(np.float32(max(offset, 1.0)))
  assert np.max(np.abs(np.asarray(moments.mean, np.float64) - mean)) <= spacing
  assert np.max(np.abs(np.asarray(moments.var) - var) / var) < 1e-5
  assert np.all(np.asarray(moments.count) == np.prod([shape[a] for a in axes]))
  weights = rng.standard_normal(var.shape)
  with jax.enable_x64(True):
    def loss(fn, x):
      m = fn(x)
      return jnp.sum(weights * (m[0] + m[1] ** 2))
    got = jax.grad(functools.partial(
        loss, lambda x: (lambda m: (m.mean, m.var))(stats.fused_row_moments(x, axes))))(
            jnp.asarray(x64))
    want = jax.grad(functools.partial(
        loss, lambda x: (jnp.mean(x, axes, keepdims=True), jnp.var(x, axes, keepdims=True))))(
            jnp.asarray(x64))
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-8 * float(jnp.max(jnp.abs(want)))


def test_moments_with_axes_none_reduce_every_axis_as_numpy():
  x = np.random.default_rng(3).standard_normal((4, 5, 3)) * 2 + 1e4
  mean, var = jaxnorm.moments(jnp.asarray(x, jnp.float32))
  x64 = x.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(mean, x64.mean(), rtol=1e-7)
  np.testing.assert_allclose(var, x64.var(), rtol=1e-4)
  assert mean.shape == var.shape == ()
  assert jaxnorm.moments(x, keepdims=True)[0].shape == (1, 1, 1)
