"""layer_norm, rms_norm, group_norm, instance_norm and normalize against float64 references."""
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxnorm
from tests import reference

OFFSETS = [1e0, 1e2, 1e4, 1e5, 1e6, 1e7]


def run(fn, use_jit, *args, **kwargs):
  bound = functools.partial(fn, **kwargs)
  return (jax.jit(bound) if use_jit else bound)(*args)


def data(shape, offset=0.0, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + offset).astype(dtype)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", ["layer", "group", "instance", "batch"])
def test_float32_far_from_zero_within_1e4_of_float64(name, offset):
  """The issue's bar: float32 data with std 1 at offsets up to 1e6 (and 1e7) within 1e-4."""
  x = data((16, 8, 32), offset)
  if name == "layer":
    y, ref = jaxnorm.layer_norm(x, epsilon=0.0), reference.standardize(x, (2,))
  elif name == "group":
    y, ref = jaxnorm.group_norm(x, num_groups=4, epsilon=0.0), reference.group_norm(x, 4)
  elif name == "instance":
    y, ref = jaxnorm.instance_norm(x, epsilon=0.0), reference.standardize(x, (1,))
  else:
    y, _ = jaxnorm.batch_norm(x, None, training=True, epsilon=0.0)
    ref = reference.standardize(x, (0, 1))
  assert reference.max_error(y, ref) < 1e-4


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_masked_far_from_zero_with_first_rows_masked(offset):
  """The shift must come from valid data even when the first rows are padding (zeros)."""
  x = data((64, 16), offset)
  where = np.ones((64, 1), bool)
  where[:5] = False
  x[:5] = 0.0
  y, _ = jaxnorm.batch_norm(x, None, training=True, epsilon=0.0, where=where)
  assert reference.max_error(y, reference.standardize(x, (0,), where), where) < 1e-4
  y = jaxnorm.layer_norm(x.T, epsilon=0.0, where=where.T)
  assert reference.max_error(y, reference.standardize(x.T, (1,), where.T), where.T) < 1e-4


@pytest.mark.parametrize("use_jit", [False, True])
def test_layer_norm_matches_reference(use_jit):
  """Random shapes, masks and data. Eager dispatch compiles every primitive anew for each new
  shape, so the eager variant draws 4 examples and the jit one the profile's number."""
  examples = settings.default.max_examples if use_jit else 4

  @settings(max_examples=examples)
  @given(seed=st.integers(0, 10_000), masked=st.booleans(), rows=st.integers(1, 6),
         features=st.integers(2, 9))
  def check(seed, masked, rows, features):
    check_layer_norm_matches_reference(use_jit, seed, masked, rows, features)

  check()


def check_layer_norm_matches_reference(use_jit, seed, masked, rows, features):
  rng = np.random.default_rng(seed)
  x = data((rows, 3, features), 50.0, seed)
  scale, bias = rng.standard_normal(features), rng.standard_normal(features)
  where = rng.random((rows, 3, features)) < 0.7 if masked else None
  y = run(jaxnorm.layer_norm, use_jit, x, scale.astype(np.float32), bias.astype(np.float32),
          epsilon=1e-6, where=where)
  ref = reference.standardize(x, (2,), where, 1e-6) * scale + bias
  # Masked-out positions are normalized too, but with a spread they did not enter: compare
  # the valid ones, relative to the output's size (two close values give a large output).
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-4


@pytest.mark.parametrize("use_jit", [False, True])
def test_layer_norm_multiple_reduction_and_feature_axes(use_jit):
  x = data((4, 5, 6), 3.0)
  scale = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
  y = run(jaxnorm.layer_norm, use_jit, x, scale, reduction_axes=(1, 2), feature_axes=(1, 2))
  ref = reference.standardize(x, (1, 2), epsilon=1e-6) * scale
  assert reference.max_error(y, ref) < 1e-5


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_rms_norm_matches_reference(use_jit, masked):
  rng = np.random.default_rng(2)
  x = data((4, 7, 10), 2.0)
  scale = rng.standard_normal(10).astype(np.float32)
  where = rng.random((4, 7, 1)) < 0.5 if masked else None
  y = run(jaxnorm.rms_norm, use_jit, x, scale, where=where)
  ref = reference.rms_norm(x, (2,), where, 1e-6) * scale
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-5


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("groups,group_size", [(4, None), (None, 2), (1, None), (8, None)])
def test_group_norm_matches_reference(use_jit, groups, group_size):
  rng = np.random.default_rng(3)
  x = data((3, 5, 4, 8), 100.0)
  scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
  y = run(jaxnorm.group_norm, use_jit, x, scale, bias, num_groups=groups, group_size=group_size)
  ref = reference.group_norm(x, groups or 8 // group_size, epsilon=1e-6) * scale + bias
  assert reference.max_error(y, ref) < 1e-4


@pytest.mark.parametrize("mask_shape", [(3, 5, 4, 8), (3, 5, 4, 1), (3, 1, 1, 8), (1, 5, 4, 1)])
def test_group_norm_accepts_masks_that_broadcast(mask_shape):
  rng = np.random.default_rng(4)
  x = data((3, 5, 4, 8), 10.0)
  where = rng.random(mask_shape) < 0.6
  where.reshape(-1)[0] = True
  y = jaxnorm.group_norm(x, num_groups=4, where=where)
  full = np.broadcast_to(where, x.shape)
  np.testing.assert_allclose(y, jaxnorm.group_norm(x, num_groups=4, where=full), atol=1e-6)
  ref = reference.group_norm(x, 4, full, 1e-6)
  valid = np.broadcast_to(
      full.reshape(3, 5, 4, 4, 2).any(axis=(1, 2, 4), keepdims=True), (3, 5, 4, 4, 2))
  assert reference.max_error(y, ref, valid.reshape(x.shape)) < 1e-4


@pytest.mark.parametrize("use_jit", [False, True])
def test_instance_norm_matches_reference(use_jit):
  x = data((2, 6, 5, 3), -40.0)
  y = run(jaxnorm.instance_norm, use_jit, x)
  assert reference.max_error(y, reference.standardize(x, (1, 2), epsilon=1e-6)) < 1e-5


def test_normalize_with_given_statistics():
  x = data((10, 4), 5.0)
  mean, var = np.arange(4.0), np.arange(1.0, 5.0)
  scale, bias = np.full(4, 2.0), np.full(4, -1.0)
  y = jaxnorm.normalize(x, mean, var, scale, bias, epsilon=1e-3)
  ref = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-3) * 2 - 1
  assert reference.max_error(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_half_precision_out(dtype):
  x = jnp.asarray(data((8, 64), 300.0), dtype)
  y = jaxnorm.layer_norm(x)
  assert y.dtype == dtype
  ref = reference.standardize(np.asarray(x, np.float32), (1,), epsilon=1e-6)
  tol = reference.TOLERANCE[jnp.dtype(dtype).name]
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol * 10, rtol=tol * 2)
  # float32 parameters promote the output, as in Flax
  assert jaxnorm.layer_norm(x, jnp.ones(64)).dtype == jnp.float32
  assert jaxnorm.layer_norm(x, jnp.ones(64), dtype=dtype).dtype == dtype


def test_layer_norm_gradient_equals_float64_analytic():
  """dL/dx for L = sum(w * y): (w - mean(w) - y * mean(w * y)) / sigma, per row."""
  rng = np.random.default_rng(6)
  x = data((5, 16), 1e4, 6)
  w = rng.standard_normal((5, 16)).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(w * jaxnorm.layer_norm(x, epsilon=0.0)))(x)
  y = reference.standardize(x, (1,))
  sigma = np.asarray(x, np.float64).std(axis=1, keepdims=True)
  expected = (w - w.mean(1, keepdims=True) - y * (w * y).mean(1, keepdims=True)) / sigma
  np.testing.assert_allclose(grad, expected, atol=2e-4)


def test_works_under_vmap_over_examples():
  x = data((6, 4, 8), 3.0)
  y = jax.vmap(lambda row: jaxnorm.layer_norm(row))(x)
  np.testing.assert_allclose(y, jaxnorm.layer_norm(x), atol=1e-6)


# --- properties over shapes, axes, masks and dtypes --------------------------------------------

DTYPES = ["float32", "bfloat16", "float16", "float64"]
OUTPUT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 3e-3, "float64": 1e-9}


@st.composite
def layer_case(draw):
  """x's shape, reduction axes (any non-empty set), a mask shape that broadcasts, a dtype."""
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
  axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
  mask_shape = tuple(draw(st.sampled_from([s, 1])) for s in shape)
  use_mask = draw(st.booleans())
  return shape, axes, (mask_shape if use_mask else None), draw(st.sampled_from(DTYPES)), draw(
      st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.0, 1e2, 1e4]))


def half_safe(offset, dtype):
  return min(offset, 1e3) if dtype == "float16" else offset


@given(layer_case())
def test_layer_norm_property_every_dtype(args):
  shape, axes, mask_shape, dtype, seed, offset = args
  rng = np.random.default_rng(seed)
  where = None if mask_shape is None else rng.random(mask_shape) < 0.6
  with jax.enable_x64(dtype == "float64"):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + half_safe(offset, dtype), dtype)
    y = jax.jit(functools.partial(jaxnorm.layer_norm, reduction_axes=axes, epsilon=1e-3))(
        x, where=where)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = reference.standardize(np.asarray(x.astype(jnp.float32 if dtype != "float64"
                                                    else jnp.float64)), axes, where, 1e-3)
  valid = reference.mask_of(where, shape)
  assert np.all(np.isfinite(np.asarray(y, np.float64)[valid]))
  assert reference.relative_error(y, ref, valid) < OUTPUT_TOLERANCE[dtype]


@st.composite
def group_case(draw):
  batch = draw(st.integers(1, 3))
  spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
  groups, size = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  shape = (batch, *spatial, groups * size)
  mask_shape = tuple(draw(st.sampled_from([s, 1])) for s in shape)
  use_mask = draw(st.booleans())
  return shape, groups, (mask_shape if use_mask else None), draw(st.sampled_from(DTYPES)), draw(
      st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.0, 1e2, 1e4]))


@given(group_case())
def test_group_norm_property_every_dtype(args):
  shape, groups, mask_shape, dtype, seed, offset = args
  rng = np.random.default_rng(seed)
  where = None if mask_shape is None else rng.random(mask_shape) < 0.6
  with jax.enable_x64(dtype == "float64"):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + half_safe(offset, dtype), dtype)
    y = jax.jit(functools.partial(jaxnorm.group_norm, num_groups=groups, epsilon=1e-3))(
        x, where=where)
    assert y.dtype == x.dtype and y.shape == x.shape
    wide = np.asarray(x.astype(jnp.float64 if dtype == "float64" else jnp.float32))
    full_mask = None if where is None else np.broadcast_to(where, shape)
    ref = reference.group_norm(wide, groups, full_mask, 1e-3)
  valid = reference.mask_of(where, shape)
  assert np.all(np.isfinite(np.asarray(y, np.float64)[valid]))
  assert reference.relative_error(y, ref, valid) < OUTPUT_TOLERANCE[dtype]


# --- check_grads on every function, in float64, with and without masks -------------------------

def masked_functions(where):
  """Each normalization as a function of (x, scale, bias), with the mask ``where``."""
  return {
      "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b, where=where),
      "layer_norm_two_axes": lambda x, s, b: jaxnorm.layer_norm(
          x, s, b, reduction_axes=(1, 2), where=where),
      "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s, where=where) + b,
      "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=2, where=where),
      "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b, where=where),
      "batch_norm": lambda x, s, b: jaxnorm.batch_norm(
          x, None, s, b, training=True, where=where)[0],
      "batch_norm_eval": lambda x, s, b: jaxnorm.batch_norm(
          x, jaxnorm.BatchStats(jnp.full(4, 3.0), jnp.full(4, 2.0)), s, b, training=False)[0],
      "normalize": lambda x, s, b: jaxnorm.normalize(x, jnp.mean(x, (0, 1)), jnp.var(x, (0, 1)),
                                                     s, b),
  }


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(masked_functions(None)))
def test_check_grads_float64(name, masked):
  rng = np.random.default_rng(7)
  where = None
  if masked:
    where = rng.random((3, 5, 1)) < 0.6
    where[:, :2] = True  # at least two valid positions per example
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((3, 5, 4)) * 2 + 3, jnp.float64)
    scale = jnp.asarray(rng.standard_normal(4) + 1, jnp.float64)
    bias = jnp.asarray(rng.standard_normal(4), jnp.float64)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float64)
    fn = masked_functions(where)[name]
    loss = jax.jit(lambda x, s, b: jnp.sum(weights * fn(x, s, b) ** 2))
    check_grads(loss, (x, scale, bias), order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_group_norm_takes_a_scalar_or_lower_rank_mask_like_layer_norm():
  x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32) + 5
  expected = reference.group_norm(x, 2)
  for mask in (jnp.array(True), jnp.ones((8,), bool)):
    assert reference.max_error(jaxnorm.group_norm(x, num_groups=2, where=mask, epsilon=0.0),
                               expected) < 1e-4
  row_mask = np.array([True, False, True, True, False, True, True, True])
  assert reference.max_error(
      jaxnorm.group_norm(x, num_groups=2, where=row_mask, epsilon=0.0),
      reference.group_norm(x, 2, where=np.broadcast_to(row_mask, x.shape)),
      np.broadcast_to(row_mask, x.shape)) < 1e-4


def test_moments_over_no_axis_with_a_mask_are_the_valid_values_themselves():
  x = np.arange(6.0, dtype=np.float32).reshape(2, 3) + 1e4
  where = x > 1e4 + 2
  mean, var = jaxnorm.moments(x, (), where=where)
  expected_mean, expected_var, _ = reference.moments(x, (), where)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-7)
  np.testing.assert_array_equal(var, expected_var)


# --- the fused row path (XLA's CPU kernel for 4096 rows and more) --------------------------------

ROW_CASES = {
    "layer_norm": lambda x, s, b, axes: jaxnorm.layer_norm(x, s, b, reduction_axes=axes,
                                                           feature_axes=axes),
    "rms_norm": lambda x, s, b, axes: jaxnorm.rms_norm(x, s, reduction_axes=axes,
                                                       feature_axes=axes) + b,
}


def float64_row_norm(name, x, s, b, axes):
  """The textbook formula in float64 (two passes), differentiated by JAX."""
  if name == "layer_norm":
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * s + b
  return x / jnp.sqrt(jnp.mean(jnp.square(x), axes, keepdims=True) + 1e-6) * s + b


@pytest.mark.parametrize("offset,spread", [(0.0, 2.0), (1e4, 2.0), (1.0, 1e-3)])
@pytest.mark.parametrize("shape,axes", [((4096, 8), (1,)), ((2, 2048, 4, 2), (2, 3))])
@pytest.mark.parametrize("name", list(ROW_CASES))
def test_fused_row_path_against_float64(name, shape, axes, offset, spread):
  """From 4096 rows on CPU the forward and gradient take the fused formulas; same results.

  (A spread of 1e-3 makes epsilon, 1e-6, matter as much as the variance.)
  """
  from jaxnorm._src.fast import xla  # pylint: disable=import-outside-toplevel
  assert xla.fuses_rows(shape, None, axes)
  rng = np.random.default_rng(11)
  x = (rng.standard_normal(shape) * spread + offset).astype(np.float32)
  feature_shape = tuple(shape[a] for a in axes)
  s = (rng.standard_normal(feature_shape) + 1).astype(np.float32)
  b = rng.standard_normal(feature_shape).astype(np.float32)
  weights = rng.standard_normal(shape).astype(np.float32)

  def loss(fn, x, s, b):
    return jnp.sum(weights * fn(x, s, b, axes) ** 2) / x.size

  step = jax.jit(jax.value_and_grad(functools.partial(loss, ROW_CASES[name]), (0, 1, 2)))
  if jax.default_backend() == "cpu":  # the CPU branch is the one lowered: it has the barriers
    assert "optimization_barrier" in step.lower(x, s, b).as_text()
  values = step(x, s, b)
  y = jax.jit(ROW_CASES[name], static_argnums=3)(x, s, b, axes)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in (x, s, b)]
    ref_fn = functools.partial(float64_row_norm, name)
    y_ref = ref_fn(*args64, axes)
    ref = jax.value_and_grad(functools.partial(loss, ref_fn), (0, 1, 2))(*args64)
  assert reference.max_error(y, y_ref) < 2e-5
  assert abs(float(values[0]) - float(ref[0])) < 1e-5 * float(ref[0])
  for got, want in zip(values[1], ref[1]):
    scale = float(np.max(np.abs(np.asarray(want))))
    assert reference.max_error(got, want) < 1e-4 * scale


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_fused_row_path_forward_mode_second_order_and_vmap(name):
  """jvp, Hessian-vector products and vmap through the fused formulas, in float64."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((4096, 3)) * 2 + 3)
    s = jnp.asarray(rng.standard_normal(3) + 1)
    b = jnp.asarray(rng.standard_normal(3))
    weights = jnp.asarray(rng.standard_normal(x.shape))
    fn = ROW_CASES[name]
    loss = jax.jit(lambda x, s, b: jnp.sum(weights * jnp.sin(fn(x, s, b, (1,)))))
    ref_loss = lambda x, s, b: jnp.sum(weights * jnp.sin(float64_row_norm(name, x, s, b, (1,))))
    check_grads(loss, (x, s, b), order=2, modes=["fwd", "rev"], atol=1e-4, rtol=1e-4)
    hvp = jax.jvp(jax.grad(loss), (x, s, b), (x, s, b))[1]
    ref_hvp = jax.jvp(jax.grad(ref_loss), (x, s, b), (x, s, b))[1]
    assert float(jnp.max(jnp.abs(hvp - ref_hvp))) < 1e-8 * float(jnp.max(jnp.abs(ref_hvp)))
    batch = jnp.stack([x, 2 * x - 1])
    grads = jax.vmap(jax.grad(loss), (0, None, None))(batch, s, b)
    ref_grads = jax.vmap(jax.grad(ref_loss), (0, None, None))(batch, s, b)
    assert float(jnp.max(jnp.abs(grads - ref_grads))) < 1e-8 * float(jnp.max(jnp.abs(ref_grads)))


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_fused_and_general_row_formulas_agree(name):
  """The CPU kernel's formulas and the general ones give the same values and gradients."""
  from jaxnorm._src.fast import xla  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((64, 32)) * 3 + 1e3, jnp.float32)
  s = jnp.asarray(rng.standard_normal(32) + 1, jnp.float32)
  b = jnp.asarray(rng.standard_normal(32), jnp.float32)
  cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def run_formula(fused):
    if name == "layer_norm":
      fn = lambda x, s, b: xla._normalize_local(  # pylint: disable=protected-access
          x, None, s, b, (1,), 1e-6, fused)[0]
    else:
      fn = lambda x, s, b: xla._rms_local(  # pylint: disable=protected-access
          x, None, s, (1,), 1e-6, fused) + b
    y, vjp = jax.vjp(fn, x, s, b)
    return (y, *vjp(cot), jax.jvp(fn, (x, s, b), (cot, s, b))[1])

  for got, want in zip(jax.jit(lambda: run_formula(True))(), jax.jit(lambda: run_formula(False))()):
    assert float(jnp.max(jnp.abs(got - want))) <= 2e-5 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("rows", [8, 4096])
def test_integer_parameters_differentiate_like_float_ones(rows):
  """An integer scale or bias is a constant: gradients flow to x as with the float value."""
  x = jnp.asarray(data((rows, 16), 3.0))
  for fn in (lambda x, s: jaxnorm.rms_norm(x, s), lambda x, s: jaxnorm.layer_norm(x, s, s)):
    with_int = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, 2))))(x)
    with_float = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, 2.0))))(x)
    assert fn(x, 2).dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(with_int), np.asarray(with_float))


def test_shape_polymorphic_export_of_row_norms():
  """A symbolic batch size takes the general formulas; the export runs at any batch size."""
  from jax import export  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(data((4096, 32), 5.0))
  spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 32"), jnp.float32)
  for fn in (jaxnorm.layer_norm, jaxnorm.rms_norm):
    exported = export.export(jax.jit(fn))(spec)
    np.testing.assert_allclose(exported.call(x), fn(x), rtol=1e-5, atol=1e-5)
