"""The Pallas kernels for layer and RMS norm: values and gradients, fallbacks, lowering.

On this CPU the kernels run in Pallas interpret mode (``jaxnorm.kernels("pallas")`` picks the
Mosaic layout there; the Triton layout is run directly), compared with the reference path
(``jaxnorm.kernels("reference")``) and float64 NumPy. Lowering for ``cuda`` and ``tpu`` runs
Pallas's own checks (power-of-two Triton arrays, Mosaic's (8, 128) block rule) on the benchmark
shapes and on odd ones, with abstract inputs (nothing is allocated); it says nothing about speed.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm._src.fast import pallas
from jaxnorm._src.fast import pallas_blocks
from jaxnorm._src.fast import pallas_rows
from jaxnorm._src.fast import xla
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


def _data(shape, offset, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * 2 + offset, dtype)


def _kernel_calls(f, *args):
  """The kernels ``f`` runs on this CPU (its jaxpr also holds the GPU and TPU branches)."""
  return str(jax.make_jaxpr(f)(*args)).count("interpret=True")


def _loss_and_grads(norm, mode):
  """``jit(value_and_grad)`` of a weighted sum of ``norm``'s output, traced under ``mode``."""
  def loss(x, *params):
    y = norm(x, *params).astype(jnp.float32)
    return jnp.sum(jnp.sin(y)), y

  def run(*args):
    with jaxnorm.kernels(mode):
      return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(
          *args)
  return run


def _assert_close(got, want, dtype, scale=1.0):
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_kernel_equals_reference(dtype):
  # Rows near 0 and rows around 1e6 (each row is normalized on its own).
  x = jnp.concatenate([_data((1, 9, 1000), 0.0, dtype), _data((1, 9, 1000), 1e6, dtype, 3)])
  scale, bias = _data((1000,), 1.0, dtype, 1), _data((1000,), 0.0, dtype, 2)
  norm = lambda x, s, b: jaxnorm.layer_norm(x, s, b, epsilon=1e-6)
  with jaxnorm.kernels("pallas"):
    assert _kernel_calls(jax.grad(lambda *a: jnp.sum(norm(*a))), x, scale, bias) == 2
  (_, y), grads = _loss_and_grads(norm, "pallas")(x, scale, bias)
  (_, y_ref), grads_ref = _loss_and_grads(norm, "reference")(x, scale, bias)
  # Independent: float64 NumPy on the same rounded input.
  x64 = np.asarray(x, np.float64)
  want = (reference.standardize(x64, (2,), epsilon=1e-6) * np.asarray(scale, np.float64)
          + np.asarray(bias, np.float64))
  _assert_close(y, want, dtype, scale=4)
  _assert_close(y, y_ref, dtype, scale=4)
  for got, ref in zip(grads, grads_ref):
    _assert_close(got, ref, dtype, scale=float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_kernel_equals_reference(dtype):
  x = _data((3, 11, 768), 1e6 if dtype == "float32" else 3.0, dtype)
  scale = _data((768,), 0.0, dtype, 1)
  norm = lambda x, s: jaxnorm.rms_norm(x, s, epsilon=1e-6, scale_offset=1.0)
  with jaxnorm.kernels("pallas"):
    assert _kernel_calls(jax.grad(lambda *a: jnp.sum(norm(*a))), x, scale) == 2
  (_, y), grads = _loss_and_grads(norm, "pallas")(x, scale)
  (_, y_ref), grads_ref = _loss_and_grads(norm, "reference")(x, scale)
  x64 = np.asarray(x, np.float64)
  want = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6) * (
      1 + np.asarray(scale, np.float64))
  _assert_close(y, want, dtype, scale=4)
  _assert_close(y, y_ref, dtype, scale=4)
  for got, ref in zip(grads, grads_ref):
    _assert_close(got, ref, dtype, scale=float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_layer_norm_kernel_scale_offset_and_statistics_gradients():
  """The returned moments carry gradients as the XLA path's do (dx from d var, d residual)."""
  x = _data((16, 128), 1e4, "float32")
  scale = _data((128,), 0.0, "float32", 1)
  weights = _data((16, 1), 0.0, "float32", 2)

  def loss(rows, x, scale):
    y, moments = rows(x, None, scale + 1.0, None, (1,), 1e-5)
    return jnp.sum(jnp.cos(y)) + jnp.sum(weights * (moments.var + 3 * moments.residual)), moments

  with jaxnorm.kernels("pallas"):
    (value, moments), grads = jax.jit(jax.value_and_grad(
        lambda *a: loss(pallas.normalize_rows, *a), (0, 1), has_aux=True))(x, scale)
  (value_xla, _), grads_xla = jax.jit(jax.value_and_grad(
      lambda *a: loss(xla.normalize_rows, *a), (0, 1), has_aux=True))(x, scale)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for g, w in zip(grads, grads_xla):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(w))))
  mean, var, _ = reference.moments(x, (1,))
  np.testing.assert_allclose(moments.shift + moments.residual, mean, rtol=1e-7)
  np.testing.assert_allclose(moments.var, var, rtol=1e-4)
  np.testing.assert_array_equal(moments.count, np.full((16, 1), 128.0))


def test_several_trailing_axes_and_scalar_parameters():
  """Trailing reduced axes are flattened into one row; scalar and integer params broadcast."""
  x = _data((3, 4, 5, 6), 50.0, "float32")
  scale = _data((5, 6), 1.0, "float32", 1)

  def norms(x):
    ln = jaxnorm.layer_norm(x, scale, 0.5, reduction_axes=(-2, -1), feature_axes=(-2, -1))
    return ln, jaxnorm.rms_norm(x, jnp.arange(6))

  def step(x):
    return norms(x), jax.grad(lambda x: sum(jnp.sum(jnp.sin(y)) for y in norms(x)))(x)

  with jaxnorm.kernels("pallas"):
    assert _kernel_calls(step, x) == 6  # LN and RMS: forward twice, backward once
    got = jax.jit(step)(x)
  with jaxnorm.kernels("reference"):
    want = jax.jit(step)(x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


def test_vmap_of_grad_through_kernels():
  x = _data((4, 8, 256), 100.0, "float32")
  scale = _data((256,), 1.0, "float32", 1)

  def step(x, scale):
    ln = lambda x, s: jnp.sum(jnp.sin(jaxnorm.layer_norm(x, s)))
    rms = lambda x, s: jnp.sum(jnp.sin(jaxnorm.rms_norm(x, s)))
    return jax.grad(ln, (0, 1))(x, scale), jax.grad(rms, (0, 1))(x, scale)

  with jaxnorm.kernels("pallas"):
    batched = jax.jit(jax.vmap(step, in_axes=(0, None)))
    assert _kernel_calls(batched, x, scale) == 4
    got = batched(x, scale)
  with jaxnorm.kernels("reference"):
    want = jax.jit(step)(x[2], scale)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g[2], w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


def test_triton_layout_in_interpret_mode():
  """The GPU kernel's own code (padded power-of-two width, masked edges, a row loop in the
  backward) run in interpret mode: 21 rows of 100 in blocks of 2 chunks of 8 rows."""
  rows, features = 21, 100
  plan = pallas_blocks.Plan("triton", rows, features, 128, 8, 2, True)
  spec = pallas_rows.Spec(1e-6, jnp.float32, plan)
  x = _data((rows, features), 1e6, "float32")
  scale, bias = _data((features,), 1.0, "float32", 1), _data((features,), 0.0, "float32", 2)

  def losses(x, scale, bias):
    y = pallas_rows.layer_norm_rows(x, scale, bias, spec)[0]
    rms = jnp.sum(jnp.sin(pallas_rows.rms_norm_rows(x, scale, spec)))
    return jnp.sum(jnp.sin(y)) + rms, y

  def xla_losses(x, scale, bias):
    y = xla.normalize_rows(x, None, scale, bias, (1,), 1e-6)[0]
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.sin(xla.rms_rows(x, None, scale, (1,), 1e-6))), y

  (value, y), grads = jax.jit(jax.value_and_grad(losses, (0, 1, 2), has_aux=True))(
      x, scale, bias)
  want = jax.jit(jax.value_and_grad(xla_losses, (0, 1, 2), has_aux=True))(x, scale, bias)
  for g, w in zip(jax.tree.leaves(((value, y), grads)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))
  want_y = reference.standardize(x, (1,), epsilon=1e-6) * np.asarray(scale) + np.asarray(bias)
  np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=1e-4)


def test_unsupported_calls_take_the_xla_path():
  x = _data((6, 130), 1e3, "float32")
  mask = np.arange(6 * 130).reshape(6, 130) % 3 != 0
  with jaxnorm.kernels("pallas"):
    masked = lambda x: jaxnorm.layer_norm(x, where=mask)
    columns = lambda x: jaxnorm.layer_norm(x, reduction_axes=0, feature_axes=0)
    rms_masked = lambda x: jaxnorm.rms_norm(x, where=mask)
    fallbacks = lambda x: (masked(x), columns(x), rms_masked(x))
    assert _kernel_calls(fallbacks, x) == 0
    got = jax.jit(fallbacks)(x)
  with jaxnorm.kernels("reference"):
    want = jax.jit(fallbacks)(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  with jaxnorm.kernels("pallas"):
    assert _kernel_calls(lambda x: jaxnorm.layer_norm(x), x) == 1
  with jaxnorm.kernels("xla"):
    assert _kernel_calls(lambda x: jaxnorm.layer_norm(x), x) == 0
  # A parameter varying along a kept axis, and rows too wide for a block.
  assert pallas.row_param(jnp.ones((6, 1)), (6, 130), (1,), jnp.float32) is False
  assert pallas_blocks.plan_for("triton", 4, pallas_blocks.MAX_FEATURES + 1, jnp.float32) is None


BENCHMARK_SHAPES = [(4096, 1024), (4096, 4096), (16384, 8192), (32768, 12288)]
ODD_SHAPES = [(4099, 768), (37, 1000), (1025, 4096), (4097, 12288)]


def _lowered(platform, shape, dtype, direct):
  """StableHLO of LN and RMS value-and-grad for ``platform``: the kernels on ``dtype`` itself
  (``direct``), or through ``jaxnorm.layer_norm``/``rms_norm`` under ``kernels("pallas")``."""
  features = shape[-1]
  scale, bias = jnp.ones(features, dtype), jnp.zeros(features, dtype)
  plan = pallas_blocks.plan_for(pallas.PLATFORM_LAYOUTS[platform], shape[0], features, dtype)
  spec = pallas_rows.Spec(1e-6, jnp.dtype(dtype), plan)

  def loss(x):
    if direct:
      return (jnp.sum(pallas_rows.layer_norm_rows(x, scale, bias, spec)[0].astype(jnp.float32))
              + jnp.sum(pallas_rows.rms_norm_rows(x, scale, spec).astype(jnp.float32)))
    return (jnp.sum(jaxnorm.layer_norm(x, scale, bias).astype(jnp.float32))
            + jnp.sum(jaxnorm.rms_norm(x, scale).astype(jnp.float32)))

  with jaxnorm.kernels("pallas"):
    traced = jax.jit(jax.value_and_grad(loss)).trace(jax.ShapeDtypeStruct(shape, dtype))
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(platform, custom_call):
  cases = [(shape, dtype, True) for shape in BENCHMARK_SHAPES + ODD_SHAPES
           for dtype in ("float32", "bfloat16")]
  for shape, dtype, direct in cases + [(ODD_SHAPES[0], "bfloat16", False)]:
    text = _lowered(platform, shape, dtype, direct)
    # LN forward and backward, RMS forward and backward: four kernels, nothing else custom.
    assert text.count(f"@{custom_call}(") == 4, (shape, dtype, direct)
    assert text.count("stablehlo.custom_call") == 4, (shape, dtype, direct)


def test_pallas_lowering_checks_reject_a_bad_block():
  """What the lowering tests above rely on: Pallas refuses blocks the hardware cannot take."""
  spec = pallas_rows.Spec(1e-6, jnp.float32, pallas_blocks.Plan("mosaic", 37, 1000, 1000, 3, 1,
                                                              False))
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    jax.jit(lambda x: pallas_rows.rms_norm_rows(x, None, spec)).trace(
        jax.ShapeDtypeStruct((37, 1000), jnp.float32)).lower(lowering_platforms=("tpu",))
  spec = pallas_rows.Spec(1e-6, jnp.float32, pallas_blocks.Plan("triton", 37, 1000, 1000, 4, 1,
                                                              False))
  with pytest.raises(ValueError, match="power of 2"):
    jax.jit(lambda x: pallas_rows.rms_norm_rows(x, None, spec)).trace(
        jax.ShapeDtypeStruct((37, 1000), jnp.float32)).lower(lowering_platforms=("cuda",))


def test_too_wide_rows_lower_without_a_kernel():
  features = pallas_blocks.MAX_FEATURES * 2
  with jaxnorm.kernels("pallas"):
    text = jax.jit(lambda x: jaxnorm.layer_norm(x)).trace(
        jax.ShapeDtypeStruct((8, features), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
  assert "custom_call" not in text


def test_accelerator_benchmark_skips_cleanly_without_an_accelerator():
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--quick"],
      capture_output=True, text=True, timeout=120, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "no GPU or TPU" in result.stdout


# ---- fused residual add + norm ----------------------------------------------------------------

ADD_NORMS = {
    "layer": lambda x, r, s, b, **k: jaxnorm.add_layer_norm(x, r, s, b, epsilon=1e-6, **k),
    "rms": lambda x, r, s, b, **k: jaxnorm.add_rms_norm(x, r, s, epsilon=1e-6,
                                                        scale_offset=1.0, **k),
}


def _add_loss_and_grads(norm, mode, **options):
  def loss(x, residual, scale, bias):
    y, h = norm(x, residual, scale, bias, **options)
    # h's cotangent is nonzero and not constant, so dx and d residual carry both paths.
    return (jnp.sum(jnp.sin(y.astype(jnp.float32)))
            + jnp.sum(jnp.cos(h.astype(jnp.float32) * 1e-3))), (y, h)

  def run(*args):
    with jaxnorm.kernels(mode):
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
      calls = _kernel_calls(fn, *args) if mode == "pallas" else None
      return fn(*args), calls
  return run


def _want_add_norm(kind, h, scale, bias):
  """float64 norm of the rounded ``h``."""
  h, scale, bias = (np.asarray(a, np.float64) for a in (h, scale, bias))
  if kind == "layer":
    return reference.standardize(h, (h.ndim - 1,), epsilon=1e-6) * scale + bias
  return h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)


@pytest.mark.parametrize("kind", list(ADD_NORMS))
@pytest.mark.parametrize("case", ["float32_1e6", "bfloat16_branch_float32_stream_1e6",
                                  "bfloat16"])
def test_fused_add_norm_kernel_equals_reference(kind, case):
  """Values and gradients of (y, h) against the reference path and float64 NumPy: float32 at
  1e6; a bfloat16 branch added to a float32 residual stream at 1e6 (``residual_dtype``
  float32, bfloat16 y: two input dtypes, one kernel); and all in bfloat16 near 0."""
  features = 200 if kind == "layer" else 256
  options = {}
  if case == "float32_1e6":
    x, residual = _data((2, 5, features), 0.0, "float32"), _data((2, 5, features), 1e6,
                                                                 "float32", 3)
    dtype = "float32"
  elif case == "bfloat16_branch_float32_stream_1e6":
    x, residual = _data((2, 5, features), 0.0, "bfloat16"), _data((2, 5, features), 1e6,
                                                                  "float32", 3)
    options, dtype = {"residual_dtype": jnp.float32}, "bfloat16"
  else:
    x, residual = _data((2, 5, features), 0.0, "bfloat16"), _data((2, 5, features), 1.0,
                                                                  "bfloat16", 3)
    dtype = "bfloat16"
  scale, bias = _data((features,), 0.5, dtype, 1), _data((features,), 0.0, dtype, 2)
  norm = ADD_NORMS[kind]
  ((_, (y, h)), grads), calls = _add_loss_and_grads(norm, "pallas", **options)(
      x, residual, scale, bias)
  assert calls == 2  # the fused forward and backward kernels, nothing else
  ((_, (y_ref, h_ref)), grads_ref), _ = _add_loss_and_grads(norm, "reference", **options)(
      x, residual, scale, bias)
  assert y.dtype == y_ref.dtype == jnp.dtype(dtype) and h.dtype == h_ref.dtype
  np.testing.assert_array_equal(h, h_ref)  # the sum, rounded alike
  # y is the norm of h as returned (XLA's reference may skip rounding h inside its fusion).
  _assert_close(y, _want_add_norm(kind, h, scale, bias), dtype, scale=4)
  with jaxnorm.kernels("reference"):
    y_of_h = jax.jit(lambda h: norm(jnp.zeros_like(h), h, scale, bias, **options)[0])(h)
  _assert_close(y, y_of_h, dtype, scale=4)
  if case != "bfloat16":
    for got, ref in zip(grads, grads_ref):
      assert got.dtype == ref.dtype
      _assert_close(got, ref, dtype, scale=float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))
    return
  # All in bfloat16, dy and dh arrive rounded to it and the gradients are rounded to it: kernel
  # and reference each differ from float32 math on the same rounded h by about 2% of the
  # largest gradient. The kernel must be as accurate as the reference there.
  f32 = lambda a: a.astype(jnp.float32)
  ((_, _), (_, d_h, d_scale, d_bias)), _ = _add_loss_and_grads(norm, "reference")(
      jnp.zeros_like(f32(h)), f32(h), f32(scale), f32(bias))
  for got, ref, truth in zip(grads, grads_ref, (d_h, d_h, d_scale, d_bias)):
    assert got.dtype == ref.dtype
    error = lambda a: float(jnp.max(jnp.abs(f32(a) - truth)))
    assert error(got) <= 1.5 * error(ref) + 4e-3 * float(jnp.max(jnp.abs(truth))), (
        error(got), error(ref))


def test_fused_add_norm_falls_back_where_the_kernel_cannot_go():
  x, residual = _data((4, 130), 0.0, "float32"), _data((4, 130), 1e3, "float32", 3)
  mask = np.arange(4 * 130).reshape(4, 130) % 3 != 0
  with jaxnorm.kernels("pallas"):
    fallbacks = lambda x, r: (jaxnorm.add_layer_norm(x, r, where=mask),
                              jaxnorm.add_rms_norm(x, r, where=mask),
                              jaxnorm.add_layer_norm(x, r, reduction_axes=0, feature_axes=0))
    assert _kernel_calls(fallbacks, x, residual) == 0
    got = jax.jit(fallbacks)(x, residual)
    assert _kernel_calls(lambda x, r: jaxnorm.add_rms_norm(x, r), x, residual) == 1
  with jaxnorm.kernels("reference"):
    want = jax.jit(fallbacks)(x, residual)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  with jaxnorm.kernels("xla"):
    assert _kernel_calls(lambda x, r: jaxnorm.add_layer_norm(x, r), x, residual) == 0


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
def test_fused_add_norm_kernels_lower_for_gpu_and_tpu(platform, custom_call):
  # Each benchmark shape once, the dtypes alternating (the norm kernels' own test lowers both
  # dtypes on every shape; the fused kernels share their blocks), and two odd shapes.
  dtypes = ("float32", "bfloat16") * 3
  for shape, dtype in zip(BENCHMARK_SHAPES + ODD_SHAPES[:2], dtypes):
    features = shape[-1]
    scale, bias = jnp.ones(features, dtype), jnp.zeros(features, dtype)

    def loss(x, residual):
      y, h = jaxnorm.add_layer_norm(x, residual, scale, bias)
      z, g = jaxnorm.add_rms_norm(x, residual, scale)
      return sum(jnp.sum(a.astype(jnp.float32)) for a in (y, h, z, g))

    with jaxnorm.kernels("pallas"):
      traced = jax.jit(jax.grad(loss, (0, 1))).trace(
          *[jax.ShapeDtypeStruct(shape, dtype)] * 2)
      text = traced.lower(lowering_platforms=(platform,)).as_text()
    # add + LN forward and backward, add + RMS forward and backward.
    assert text.count(f"@{custom_call}(") == 4, (shape, dtype)
    assert text.count("stablehlo.custom_call") == 4, (shape, dtype)
