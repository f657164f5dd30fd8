"""Weight norm, spectral norm, weight standardization, FRN + TLU and EvoNorm.

Every function against a float64 NumPy reference (with and without jit, masks, bfloat16),
check_grads in float64, vmap; the Linen and NNX wrappers against flax's (variable trees,
outputs, checkpoints); the convolutional spectral norm against the exact operator norm; the
activation norms against timm where it imports; errors that name the fix.
"""
import functools
import importlib
import os
import sys
import types

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from jax.test_util import check_grads
from numpy.lib.stride_tricks import sliding_window_view

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from tests import reference


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def normal(shape, seed=0, offset=0.0, dtype=np.float32):
  return (np.random.default_rng(seed).standard_normal(shape) + offset).astype(dtype)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


# --- float64 references, written from the papers' formulas ---------------------------------------

def ref_weight_norm(w, scale, axes):
  w = np.asarray(w, np.float64)
  return w / np.sqrt((w * w).sum(axis=axes, keepdims=True)) * scale


def ref_scaled_ws(w, gain, gamma, epsilon):
  axes = tuple(range(w.ndim - 1))
  fan_in = np.prod([w.shape[a] for a in axes])
  mean, var, _ = reference.moments(w, axes)
  return gamma * gain * (np.asarray(w, np.float64) - mean) / np.sqrt(np.maximum(var * fan_in,
                                                                                epsilon))


def ref_frn(x, epsilon, where=None):
  x = np.asarray(x, np.float64)
  valid = reference.mask_of(where, x.shape)
  axes = tuple(range(1, x.ndim - 1))
  mean_square = np.where(valid, x * x, 0).sum(axes, keepdims=True) / valid.sum(axes, keepdims=True)
  return x / np.sqrt(mean_square + epsilon)


def ref_s0(x, groups, epsilon, v, where=None):
  x = np.asarray(x, np.float64)
  view = x.reshape(x.shape[:-1] + (groups, -1))
  valid = reference.mask_of(where, x.shape).reshape(view.shape)
  _, var, _ = reference.moments(view, tuple(range(1, x.ndim - 1)) + (x.ndim,), valid)
  std = np.broadcast_to(np.sqrt(var + epsilon), view.shape).reshape(x.shape)
  return x * sigmoid(v * x) / std


def ref_b0(x, running_var, epsilon, v, training, momentum):
  x = np.asarray(x, np.float64)
  batch_axes, spatial = tuple(range(x.ndim - 1)), tuple(range(1, x.ndim - 1))
  _, batch_var, count = reference.moments(x, batch_axes)
  var = batch_var.ravel() if training else running_var
  _, instance_var, _ = reference.moments(x, spatial)
  y = x / np.maximum(np.sqrt(var + epsilon), x * v + np.sqrt(instance_var + epsilon))
  unbiased = batch_var.ravel() * count.ravel() / (count.ravel() - 1)
  return y, momentum * running_var + (1 - momentum) * unbiased if training else running_var


# --- the functions against the references ------------------------------------------------------

@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_weight_standardize_matches_reference_far_from_zero(use_jit, offset):
  w = normal((3, 3, 4, 5), offset=offset)
  y = maybe_jit(functools.partial(jaxnorm.weight_standardize, epsilon=1e-5), use_jit)(w)
  expected = reference.standardize(w, (0, 1, 2), epsilon=1e-5)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, expected, atol=2e-4 if offset else 1e-5)
  gain = np.linspace(0.5, 2, 5).astype(np.float32)
  scaled = maybe_jit(functools.partial(jaxnorm.scaled_weight_standardize, gamma=1.7),
                     use_jit)(w, gain)
  np.testing.assert_allclose(scaled, ref_scaled_ws(w, gain, 1.7, 1e-4),
                             atol=2e-4 if offset else 1e-5)


@settings(max_examples=8)
@given(shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4),
       offset=st.sampled_from([0.0, 1e3]), seed=st.integers(0, 2**31 - 1))
def test_weight_standardize_any_kernel_shape(shape, offset, seed):
  if np.prod(shape[:-1]) < 2:
    return  # one element per output channel: an error, tested below
  w = normal(shape, seed, offset)
  np.testing.assert_allclose(jax.jit(jaxnorm.weight_standardize)(w),
                             reference.standardize(w, tuple(range(len(shape) - 1)), epsilon=1e-5),
                             atol=1e-4)


@pytest.mark.parametrize("use_jit", [False, True])
def test_weight_norm_matches_reference(use_jit):
  w, scale = normal((3, 4, 5)), normal((4,), seed=1)
  y = maybe_jit(lambda w, s: jaxnorm.weight_norm(w, s, feature_axes=1, epsilon=0.0),
                use_jit)(w, scale)
  np.testing.assert_allclose(y, ref_weight_norm(w, scale[:, None], (0, 2)), rtol=1e-5)
  whole = jaxnorm.weight_norm(w, feature_axes=None, epsilon=0.0)
  np.testing.assert_allclose(whole, ref_weight_norm(w, 1.0, None), rtol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_spectral_norm_converges_to_the_largest_singular_value(use_jit):
  w = normal((6, 2, 5))
  sigma = np.linalg.svd(w.reshape(-1, 5).astype(np.float64), compute_uv=False)[0]
  step = maybe_jit(functools.partial(jaxnorm.spectral_norm, n_steps=5), use_jit)
  state = jaxnorm.init_spectral_state(jax.random.key(0), w.shape)
  for _ in range(20):
    y, state = step(w, state)
  np.testing.assert_allclose(state.sigma, sigma, rtol=1e-5)
  np.testing.assert_allclose(y, w / sigma, rtol=1e-5)


def conv_matrix(kernel, spatial, stride):
  """The dense matrix of a VALID, strided, channels-last 2-d convolution, in float64 NumPy."""
  kernel = np.asarray(kernel, np.float64)
  cin = kernel.shape[2]
  rows = []
  for e in np.eye(spatial * spatial * cin):
    windows = sliding_window_view(e.reshape(spatial, spatial, cin), kernel.shape[:2],
                                  axis=(0, 1))[::stride, ::stride]
    rows.append(np.einsum("ijcab,abco->ijo", windows, kernel).ravel())
  return np.array(rows)


def circular_conv_norm(kernel, spatial):
  """The operator norm of a circular convolution: largest singular value over frequencies."""
  padded = np.zeros((spatial, spatial) + kernel.shape[2:])
  padded[:kernel.shape[0], :kernel.shape[1]] = kernel
  return np.linalg.svd(np.fft.fft2(padded, axes=(0, 1)), compute_uv=False).max()


def test_conv_spectral_norm_is_the_operator_norm_not_the_reshaped_kernels():
  kernel = normal((3, 3, 2, 3))
  exact = np.linalg.svd(conv_matrix(kernel, 7, 2), compute_uv=False)[0]
  reshaped = np.linalg.svd(kernel.reshape(-1, 3).astype(np.float64), compute_uv=False)[0]
  operator = jaxnorm.conv_operator(strides=2, padding="VALID")
  step = jax.jit(functools.partial(jaxnorm.spectral_norm, operator=operator))
  state = jaxnorm.init_spectral_state(jax.random.key(0), kernel.shape, input_shape=(7, 7, 2))
  for _ in range(200):
    y, state = step(kernel, state)
  np.testing.assert_allclose(state.sigma, exact, rtol=1e-4)
  np.testing.assert_allclose(y, kernel / exact, rtol=1e-4)
  assert abs(exact - reshaped) > 0.05 * exact


@pytest.mark.parametrize("use_jit", [False, True])
def test_frn_tlu_and_evonorm_s0_match_reference_with_masks(use_jit):
  x = normal((2, 4, 3, 6), offset=0.5)
  where = np.random.default_rng(1).random((2, 4, 3, 1)) < 0.7
  scale, bias, v = normal((6,), 2), normal((6,), 3), normal((6,), 4)
  frn = maybe_jit(lambda x, w: jaxnorm.filter_response_norm(x, scale, bias, where=w), use_jit)
  np.testing.assert_allclose(frn(x, where), ref_frn(x, 1e-6, where) * scale + bias, atol=1e-5)
  np.testing.assert_allclose(jaxnorm.tlu(x, bias), np.maximum(x, bias))
  s0 = maybe_jit(lambda x, w: jaxnorm.evonorm_s0(x, scale, bias, v, num_groups=3, where=w),
                 use_jit)
  np.testing.assert_allclose(s0(x, where), ref_s0(x, 3, 1e-5, v, where) * scale + bias,
                             atol=1e-5)
  same = jaxnorm.evonorm_s0(x, num_groups=None, group_size=2)
  np.testing.assert_allclose(same, ref_s0(x, 3, 1e-5, 1.0), atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_evonorm_b0_matches_reference_in_training_and_evaluation(use_jit):
  x, running, v = normal((4, 3, 3, 5), offset=1.0), 1 + normal((5,), 1) ** 2, normal((5,), 2)
  for training in (True, False):
    fn = maybe_jit(functools.partial(jaxnorm.evonorm_b0, training=training, momentum=0.8),
                   use_jit)
    y, new = fn(x, running, None, None, v)
    ref_y, ref_new = ref_b0(x, running, 1e-3, v, training, 0.8)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    np.testing.assert_allclose(new, ref_new, rtol=1e-5)


def test_evonorm_b0_pools_the_batch_variance_across_vmap_lanes():
  x = normal((4, 3, 2, 5))
  pooled = jax.jit(jax.vmap(lambda xs: jaxnorm.evonorm_b0(xs, jnp.ones(5), training=True,
                                                          axis_name="lanes"),
                            axis_name="lanes"))(x.reshape(2, 2, 3, 2, 5))
  whole = jax.jit(functools.partial(jaxnorm.evonorm_b0, training=True))(x, jnp.ones(5))
  np.testing.assert_allclose(pooled[0].reshape(x.shape), whole[0], atol=1e-6)
  np.testing.assert_allclose(pooled[1][0], whole[1], rtol=1e-6)


def test_vmap_over_kernels_equals_one_at_a_time():
  kernels = normal((3, 4, 5))
  standardize, spectral_norm = jax.jit(jaxnorm.weight_standardize), jax.jit(jaxnorm.spectral_norm)
  np.testing.assert_allclose(jax.jit(jax.vmap(jaxnorm.weight_standardize))(kernels),
                             np.stack([standardize(k) for k in kernels]), atol=1e-6)
  states = jax.vmap(lambda k: jaxnorm.init_spectral_state(k, (4, 5)))(
      jax.random.split(jax.random.key(0), 3))
  batched, _ = jax.jit(jax.vmap(jaxnorm.spectral_norm))(kernels, states)
  for i in range(3):
    one, _ = spectral_norm(kernels[i], jaxnorm.SpectralState(states.u[i], states.sigma[i]))
    np.testing.assert_allclose(batched[i], one, rtol=1e-6)


GRAD_CASES = {
    "weight_norm": lambda w, x: jaxnorm.weight_norm(w, x[0, 0, 0]),
    "weight_standardize": lambda w, x: jaxnorm.weight_standardize(w),
    "scaled_weight_standardize": lambda w, x: jaxnorm.scaled_weight_standardize(w, x[0, 0, 0]),
    "filter_response_norm": lambda w, x: jaxnorm.filter_response_norm(x, w[0, 0], w[0, 1]),
    "tlu": lambda w, x: jaxnorm.tlu(x, w[0, 0]),
    "evonorm_s0": lambda w, x: jaxnorm.evonorm_s0(x, w[0, 0], w[0, 1], w[0, 2], num_groups=3),
    "evonorm_b0": lambda w, x: jaxnorm.evonorm_b0(x, jnp.ones(3), w[0, 0], w[0, 1], w[0, 2],
                                                  training=True)[0],
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_check_grads_float64(name):
  with jax.enable_x64(True):
    w = jnp.asarray(normal((3, 3, 3), seed=5, dtype=np.float64))
    x = jnp.asarray(normal((2, 3, 4, 3), seed=6, offset=0.3, dtype=np.float64))
    def loss(w, x):
      return jnp.sum(jnp.sin(GRAD_CASES[name](w, x)))
    check_grads(jax.jit(loss), (w, x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("operator", [None, jaxnorm.conv_operator(padding="SAME")],
                         ids=["matrix", "conv"])
def test_check_grads_spectral_norm_float64(operator):
  """u and v carry no gradient, which is exact once the power iteration has converged."""
  with jax.enable_x64(True):
    w = jnp.asarray(normal((3, 3, 2, 3), seed=5, dtype=np.float64))
    shape = None if operator is None else (5, 5, 2)
    state = jaxnorm.init_spectral_state(jax.random.key(0), w.shape, input_shape=shape,
                                        dtype=jnp.float64)
    iterate = jax.jit(functools.partial(jaxnorm.spectral_norm, n_steps=10, operator=operator))
    for _ in range(30):
      _, state = iterate(w, state)
    def loss(w):
      return jnp.sum(jnp.sin(jaxnorm.spectral_norm(w, state, operator=operator)[0]))
    check_grads(jax.jit(loss), (w,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_reduce_in_float32():
  w = normal((3, 3, 4, 8), offset=3.0)
  ws = jax.jit(jaxnorm.weight_standardize)(w.astype(jnp.bfloat16))
  assert ws.dtype == jnp.bfloat16
  np.testing.assert_allclose(ws.astype(np.float32), reference.standardize(
      np.asarray(w.astype(jnp.bfloat16), np.float32), (0, 1, 2), epsilon=1e-5), atol=3e-2)
  state = jaxnorm.init_spectral_state(jax.random.key(0), w.shape, dtype=jnp.bfloat16)
  assert state.u.dtype == state.sigma.dtype == jnp.float32  # the state stays float32
  y, state = jax.jit(functools.partial(jaxnorm.spectral_norm, dtype=jnp.bfloat16))(
      w.astype(jnp.bfloat16), state)
  assert y.dtype == jnp.bfloat16 and state.u.dtype == jnp.float32
  bf16 = {"param_dtype": jnp.bfloat16}
  linen = jnn.SpectralNorm(nn.Dense(3, **bf16), **bf16)
  stats = linen.init(jax.random.key(0), jnp.ones((1, 2), jnp.bfloat16), update_stats=True)
  assert {v.dtype for v in jax.tree.leaves(stats["batch_stats"])} == {jnp.dtype(jnp.float32)}
  layer = jnnx.SpectralNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0), **bf16), rngs=nnx.Rngs(1), **bf16)
  layer(jnp.ones((1, 2), jnp.bfloat16))
  assert layer.batch_stats[("kernel", "u")][...].dtype == jnp.float32
  x = normal((2, 4, 4, 8)).astype(jnp.bfloat16)
  xf = np.asarray(x, np.float32)
  functions = jax.jit(lambda x: (jaxnorm.filter_response_norm(x),
                                  jaxnorm.evonorm_s0(x, num_groups=4),
                                  jaxnorm.evonorm_b0(x, jnp.ones(8), training=True)[0]))
  expected_outputs = (ref_frn(xf, 1e-6), ref_s0(xf, 4, 1e-5, 1.0),
                      ref_b0(xf, np.ones(8), 1e-3, 1.0, True, 0.9)[0])
  for got, expected in zip(functions(x), expected_outputs):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("call, fix", [
    (lambda: jaxnorm.weight_standardize(jnp.ones((1, 1, 1, 8))), "one element per output"),
    (lambda: jaxnorm.scaled_weight_standardize(jnp.ones((1, 8))), "fan-in of 2 or more"),
    (lambda: jaxnorm.spectral_norm(jnp.ones(4), jaxnorm.init_spectral_state(
        jax.random.key(0), (4,))), "1-d parameter"),
    (lambda: jaxnorm.evonorm_s0(jnp.ones((1, 2, 2, 6)), num_groups=4), "pick a divisor of 6"),
    (lambda: jnnx.EvoNormS0(6, num_groups=4), "pick a divisor of 6"),
    (lambda: jnn.EvoNormS0(num_groups=4).init(jax.random.key(0), jnp.ones((1, 2, 6))),
     "must divide the 6 channels"),
    (lambda: jaxnorm.filter_response_norm(jnp.ones((4, 6))), "(batch, *spatial, channels)"),
    (lambda: jnnx.SpectralNorm(nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)), operator_norm=True,
                               rngs=nnx.Rngs(0)), "input_shape=(32, 32, 3)"),
])
def test_bad_input_gets_an_error_that_names_the_fix(call, fix):
  with pytest.raises(ValueError) as error:
    call()
  assert fix in str(error.value), str(error.value)


# --- Linen and NNX against flax ----------------------------------------------------------------

def assert_trees_close(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, **tolerance), a, b)


@pytest.mark.parametrize("kwargs", [{}, {"variable_filter": None, "feature_axes": None}])
def test_linen_weight_norm_equals_flax(kwargs):
  x = normal((2, 5))
  theirs, ours = nn.WeightNorm(nn.Dense(3), **kwargs), jnn.WeightNorm(nn.Dense(3), **kwargs)
  variables = theirs.init(jax.random.key(0), x)
  assert_trees_close(variables, ours.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-6)


def test_linen_spectral_norm_equals_flax_over_training_steps():
  x = normal((2, 4, 4, 3))
  theirs = nn.SpectralNorm(nn.Conv(5, (3, 3)), n_steps=2)
  ours = jnn.SpectralNorm(nn.Conv(5, (3, 3)), n_steps=2)
  variables = theirs.init(jax.random.key(0), x, update_stats=False)
  assert_trees_close(variables, ours.init(jax.random.key(0), x, update_stats=False))
  ours_vars = variables
  for _ in range(3):
    y, stats = theirs.apply(variables, x, update_stats=True, mutable=["batch_stats"])
    y_ours, stats_ours = ours.apply(ours_vars, x, update_stats=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y, rtol=1e-5, atol=1e-6)
    variables, ours_vars = {**variables, **stats}, {**ours_vars, **stats_ours}
  assert_trees_close(ours_vars["batch_stats"], variables["batch_stats"], rtol=1e-5)


def test_nnx_wrappers_equal_flax_keep_the_checkpoint_and_leave_the_kernel_alone():
  x = normal((2, 5))
  for theirs_cls, ours_cls in [(nnx.WeightNorm, jnnx.WeightNorm),
                               (nnx.SpectralNorm, jnnx.SpectralNorm)]:
    theirs = theirs_cls(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    ours = ours_cls(nnx.Linear(5, 3, rngs=nnx.Rngs(2)), rngs=nnx.Rngs(3))
    state = nnx.state(ours)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(theirs)))  # flax's checkpoint
    nnx.update(ours, state)
    kernel = ours.layer_instance.kernel[...]
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6)  # the first call: equal
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
  # flax.nnx's SpectralNorm writes W / sigma into the layer: its kernel has changed.
  assert not np.allclose(theirs.layer_instance.kernel[...], kernel)
  # jaxnorm's weight-norm scales are parameters, which nnx.Optimizer trains; flax's are not.
  layer = jnnx.WeightNorm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)))
  assert "scales" in nnx.to_pure_dict(nnx.state(layer, nnx.Param))


def test_nnx_spectral_norm_trains_under_nnx_jit_and_eval_freezes_u():
  model = jnnx.SpectralNorm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  x = jnp.asarray(normal((4, 5)))

  @nnx.jit
  def step(model, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    return grads["layer_instance"]["kernel"][...]
  grad = step(model, x)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  model.eval()
  u = model.batch_stats[("kernel", "u")][...]
  jax.jit(lambda x: model(x))(x)  # no mutation: a closure under jax.jit works
  np.testing.assert_array_equal(model.batch_stats[("kernel", "u")][...], u)


def test_layer_conv_spectral_norm_is_the_circular_operator_norm():
  x = normal((1, 6, 6, 2))
  linen = jnn.SpectralNorm(nn.Conv(3, (3, 3), padding="CIRCULAR"), operator_norm=True)
  variables = linen.init(jax.random.key(0), x, update_stats=False)
  apply = jax.jit(functools.partial(linen.apply, update_stats=True, mutable=["batch_stats"]))
  for _ in range(100):
    _, stats = apply(variables, x)
    variables = {**variables, **stats}
  kernel = variables["params"]["layer_instance"]["kernel"]
  exact = circular_conv_norm(np.asarray(kernel, np.float64), 6)
  (sigma,) = [v for k, v in variables["batch_stats"].items() if k.endswith("sigma")]
  np.testing.assert_allclose(sigma, exact, rtol=1e-4)
  conv = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
  model = jnnx.SpectralNorm(conv, operator_norm=True, input_shape=(6, 6, 2), rngs=nnx.Rngs(1))
  call = nnx.jit(lambda m, x: m(x))
  for _ in range(100):
    y = call(model, x)
  exact = circular_conv_norm(np.asarray(conv.kernel[...], np.float64), 6)
  np.testing.assert_allclose(model.batch_stats[("kernel", "sigma")][...], exact, rtol=1e-4)
  plain = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
  plain.kernel[...] = conv.kernel[...] / model.batch_stats[("kernel", "sigma")][...]
  np.testing.assert_allclose(y, plain(x), rtol=1e-5, atol=1e-6)


def test_std_convs_equal_conv_with_a_standardized_kernel_and_load_its_checkpoint():
  x = normal((2, 5, 5, 3))
  conv = nn.Conv(4, (3, 3))
  variables = conv.init(jax.random.key(0), x)
  standardized = {"params": {**variables["params"], "kernel": jaxnorm.weight_standardize(
      variables["params"]["kernel"])}}
  np.testing.assert_allclose(jax.jit(jnn.StdConv(4, (3, 3)).apply)(variables, x),
                             jax.jit(conv.apply)(standardized, x), rtol=1e-5, atol=1e-6)
  scaled = jnn.ScaledStdConv(4, (3, 3), gamma=2.0)
  params = scaled.init(jax.random.key(0), x)["params"]
  kernel = jaxnorm.scaled_weight_standardize(params["kernel"], params["gain"], gamma=2.0)
  np.testing.assert_allclose(
      jax.jit(scaled.apply)({"params": params}, x),
      jax.jit(conv.apply)({"params": {"kernel": kernel, "bias": params["bias"]}}, x), rtol=1e-5)
  ours = jnnx.StdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  theirs = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  kernel = theirs.kernel[...]
  theirs.kernel[...] = jaxnorm.weight_standardize(kernel)
  call = nnx.jit(lambda model, x: model(x))
  np.testing.assert_allclose(call(ours, x), call(theirs, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ours.kernel[...], kernel)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(
      jnnx.ScaledStdConv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
  assert set(nnx.to_pure_dict(grads)) == {"kernel", "bias", "gain"}


def test_activation_norm_layers_equal_the_functions_linen_and_nnx():
  x = normal((4, 3, 3, 8), offset=0.2)
  cases = [(jnn.FilterResponseNorm(), jnnx.FilterResponseNorm(8),
            lambda p: jaxnorm.tlu(jaxnorm.filter_response_norm(x, p["scale"], p["bias"]),
                                  p["tau"])),
           (jnn.EvoNormS0(num_groups=4), jnnx.EvoNormS0(8, num_groups=4),
            lambda p: jaxnorm.evonorm_s0(x, p["scale"], p["bias"], p["v"], num_groups=4)),
           (jnn.TLU(), jnnx.TLU(8), lambda p: jaxnorm.tlu(x, p["tau"]))]
  for linen, nnx_layer, function in cases:
    variables = linen.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + normal(p.shape, 9), variables["params"])
    nnx.update(nnx_layer, nnx.State(jax.tree.map(nnx.Param, params)))
    np.testing.assert_allclose(linen.apply({"params": params}, x), function(params), atol=1e-6)
    np.testing.assert_allclose(nnx_layer(x), function(params), atol=1e-6)


def test_evonorm_b0_layers_keep_a_running_variance_as_batch_norm_does():
  x = normal((4, 3, 3, 8), offset=0.5)
  linen = jnn.EvoNormB0(use_running_average=False)
  variables = linen.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(8))  # init: unchanged
  y, updates = linen.apply(variables, x, mutable=["batch_stats"])
  expected_y, expected_var = jaxnorm.evonorm_b0(x, jnp.ones(8), *[variables["params"][k] for k in
                                                                 ("scale", "bias", "v")],
                                                training=True)
  np.testing.assert_allclose(y, expected_y, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], expected_var, rtol=1e-6)
  layer = jnnx.EvoNormB0(8)
  np.testing.assert_allclose(layer(x), expected_y, atol=1e-6)
  np.testing.assert_allclose(layer.var[...], expected_var, rtol=1e-6)
  layer.eval()
  evaluated = layer(x)
  np.testing.assert_allclose(layer.var[...], expected_var, rtol=1e-6)
  evaluation = jnn.EvoNormB0(use_running_average=True)
  np.testing.assert_allclose(evaluated, evaluation.apply({**variables, **updates}, x), atol=1e-6)


# --- timm, where it imports --------------------------------------------------------------------

def timm_layer(module):
  """``timm.layers.<module>``. timm's wheel needs torchvision, which pip pairs with a CUDA
  torch over a CPU one; JAXNORM_TIMM_PATH may name ``pip install --no-deps --target DIR timm``
  to load the layer files alone with the torch that is installed."""
  torch = pytest.importorskip("torch")
  path = os.environ.get("JAXNORM_TIMM_PATH")
  if path and "timm" not in sys.modules:
    for name, folder in (("timm", "timm"), ("timm.layers", "timm/layers")):
      package = types.ModuleType(name)
      package.__path__ = [os.path.join(path, folder)]
      sys.modules[name] = package
  try:
    return torch, importlib.import_module(f"timm.layers.{module}")
  except ImportError as error:
    pytest.skip(f"timm does not import here ({error}); set JAXNORM_TIMM_PATH to run this")


def to_nchw(torch, x):
  return torch.tensor(np.moveaxis(np.asarray(x, np.float32), -1, 1))


def test_frn_and_evonorm_match_timm():
  torch, frn_module = timm_layer("filter_response_norm")
  _, evo = timm_layer("evo_norm")
  x = normal((3, 4, 5, 8), offset=0.3)
  frn = frn_module.FilterResponseNormTlu2d(8, eps=1e-6)
  s0 = evo.EvoNorm2dS0(8, groups=4)
  b0 = evo.EvoNorm2dB0(8)
  with torch.no_grad():
    for layer in (frn, s0, b0):
      for parameter in layer.parameters():
        parameter.copy_(torch.tensor(normal(tuple(parameter.shape), 7)))
    theirs = [np.moveaxis(layer(to_nchw(torch, x)).numpy(), 1, -1) for layer in (frn, s0, b0)]
    b0.eval()
    theirs_eval = np.moveaxis(b0(to_nchw(torch, x)).numpy(), 1, -1)

  def param(layer, name):
    return getattr(layer, name).detach().numpy()
  ours_frn = jaxnorm.tlu(jaxnorm.filter_response_norm(
      x, param(frn, "weight"), param(frn, "bias")), param(frn, "tau"))
  ours_s0 = jaxnorm.evonorm_s0(x, param(s0, "weight"), param(s0, "bias"), param(s0, "v"),
                               num_groups=4)
  ours_b0, running = jaxnorm.evonorm_b0(x, jnp.ones(8), param(b0, "weight"),
                                        param(b0, "bias"), param(b0, "v"), training=True)
  for ours, expected in zip((ours_frn, ours_s0, ours_b0), theirs):
    np.testing.assert_allclose(ours, expected, atol=2e-5)
  np.testing.assert_allclose(running, b0.running_var.numpy(), rtol=1e-5)
  ours_eval, _ = jaxnorm.evonorm_b0(x, running, param(b0, "weight"), param(b0, "bias"),
                                    param(b0, "v"), training=False)
  np.testing.assert_allclose(ours_eval, theirs_eval, atol=2e-5)
