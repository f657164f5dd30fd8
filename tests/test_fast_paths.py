"""Every backend fast path equals the reference path, in values and gradients.

``jaxnorm.kernels("reference")`` forces the reference path; the default mode (``"xla"``) takes
the fast paths of :mod:`jaxnorm._src.fast.xla`. Each dispatched operation is compared directly
(float64, ``check_grads`` on the fast path, gradients against the reference's), and every norm
end to end.
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm
from jaxnorm._src import dispatch
from jaxnorm._src import moments as moments_lib
from jaxnorm._src import normalize
from jaxnorm._src.fast import xla

# (shape, axes, where): unmasked, masked, and enough rows for XLA's fused CPU row kernels.
CASES = {
    "rows": ((6, 10), (1,), None),
    "masked": ((6, 10), (1,), np.arange(60).reshape(6, 10) % 3 != 0),
    "columns": ((12, 5), (0,), None),
    "fused_rows": ((4096, 4), (1,), None),
}


def _data(shape, offset, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape) * 2 + offset


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_moment_sums_fast_equals_reference(case, offset):
  shape, axes, where = CASES[case]
  with jax.enable_x64(True):
    x = jnp.asarray(_data(shape, offset))
    mask = None if where is None else jnp.asarray(where)
    count = moments_lib.valid_count(shape, mask, axes, x.dtype)

    def statistics(sums, x):
      shift, total, total_sq = sums(x, count, mask, axes, None)
      mean = shift + total / count
      return mean, total_sq / count - (total / count) ** 2

    fast = functools.partial(statistics, xla.moment_sums)
    reference = functools.partial(statistics, moments_lib.moment_sums)
    for got, want in zip(jax.jit(fast)(x), jax.jit(reference)(x)):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * (1 + offset))
    weights = jnp.asarray(_data(count.shape, 0.0, seed=1))
    loss = lambda sums, x: jnp.sum(weights * (sums(x)[0] + sums(x)[1]))
    np.testing.assert_allclose(jax.jit(jax.grad(functools.partial(loss, fast)))(x),
                               jax.jit(jax.grad(functools.partial(loss, reference)))(x),
                               rtol=1e-7, atol=1e-9)
    if offset == 0.0 and case != "fused_rows":
      check_grads(jax.jit(lambda x: fast(x)[1]), (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_shift_and_scale_fast_equals_reference(offset):
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = jnp.asarray(_data((8, 3), offset))
    per_channel = [jnp.asarray(rng.standard_normal((1, 3))) for _ in range(4)]
    args = (x, per_channel[0] + offset, *per_channel[1:])
    np.testing.assert_allclose(xla.shift_and_scale(*args), normalize.shift_and_scale(*args),
                               rtol=1e-12, atol=1e-12 * (1 + offset))
    cot = jnp.asarray(rng.standard_normal(x.shape))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(cot * f(*a)), argnums=range(5)))(*args)
    for got, want in zip(grad(xla.shift_and_scale), grad(normalize.shift_and_scale)):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)  # each of the 5 arguments
    check_grads(jax.jit(xla.shift_and_scale), args, order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("operation", ["normalize_rows", "rms_rows"])
def test_row_paths_fast_equal_reference(case, operation):
  shape, axes, where = CASES[case]
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = jnp.asarray(_data(shape, 30.0))
    mask = None if where is None else jnp.asarray(where)
    feature = tuple(shape[a] if a in axes else 1 for a in range(len(shape)))
    scale = jnp.asarray(rng.standard_normal(feature) + 1)
    bias = jnp.asarray(rng.standard_normal(feature))

    def run(module, x, scale, bias):
      if operation == "normalize_rows":
        return getattr(module, operation)(x, mask, scale, bias, axes, 1e-6)[0]
      return getattr(module, operation)(x, mask, scale, axes, 1e-6) + bias

    fast, reference = functools.partial(run, xla), functools.partial(run, normalize)
    args = (x, scale, bias)
    # under jit: one compile each, where eager dispatch compiles every primitive
    np.testing.assert_allclose(jax.jit(fast)(*args), jax.jit(reference)(*args), rtol=1e-10,
                               atol=1e-10)
    cot = jnp.asarray(rng.standard_normal(shape))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(cot * f(*a)), argnums=(0, 1, 2)))(*args)
    for got, want in zip(grad(fast), grad(reference)):  # x, scale and bias
      np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)
    if case != "fused_rows":
      check_grads(jax.jit(fast), args, order=2, modes=("fwd", "rev"))


NORMS = {
    "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
    "layer_norm_masked": lambda x, s, b: jaxnorm.layer_norm(x, s, b, where=x > 1e3),
    "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s) + b,
    "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, None, s, b, training=True)[0],
    "batch_renorm": lambda x, s, b: jaxnorm.batch_renorm(
        x, jaxnorm.init_renorm_stats(x.shape[-1], x.dtype), s, b, training=True, rmax=1.5,
        dmax=0.5)[0],
    "ghost": lambda x, s, b: jaxnorm.ghost_batch_norm(x, None, s, b, training=True,
                                                      virtual_batch_size=8)[0],
    "lp_1": lambda x, s, b: jaxnorm.lp_batch_norm(x, None, s, b, training=True, p=1)[0],
    "group_norm": lambda x, s, b: jaxnorm.group_norm(x.reshape(4, 4, 16), s, b,
                                                     num_groups=4).reshape(x.shape),
    "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x.reshape(4, 4, 16), s,
                                                           b).reshape(x.shape),
    "evaluation": lambda x, s, b: jaxnorm.normalize(x, jnp.mean(x, 0), jnp.var(x, 0), s, b),
}


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_every_norm_default_equals_reference_mode(name, offset):
  """Values and gradients with the fast paths equal those of ``kernels("reference")``."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    x = jnp.asarray(_data((16, 16), offset))
    s, b = jnp.asarray(rng.standard_normal(16) + 1), jnp.asarray(rng.standard_normal(16))
    cot = jnp.asarray(rng.standard_normal((16, 16)))
    norm = NORMS[name]

    def values_and_grads():
      y, vjp = jax.vjp(jax.jit(norm), x, s, b)
      return (y, *vjp(cot))

    with jaxnorm.kernels("reference"):
      want = values_and_grads()
    got = values_and_grads()
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-8 * max(1.0, float(jnp.max(abs(w)))))


def test_reference_mode_takes_no_fast_path():
  """Under ``kernels("reference")`` the lowered layer norm has no XLA path's barrier."""
  x = jnp.ones((4096, 8))
  fast = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x) ** 2))).lower(x).as_text()
  with jaxnorm.kernels("reference"):
    reference = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(x) ** 2))).lower(
        x).as_text()
  assert "optimization_barrier" in fast and "optimization_barrier" not in reference
  assert dispatch.mode() == "xla"


def test_kernel_mode_errors_name_the_choices():
  with pytest.raises(ValueError, match="use one of xla, reference, pallas"):
    with jaxnorm.kernels("triton"):
      pass
  result = subprocess.run(
      [sys.executable, "-c", "import jaxnorm"], capture_output=True, text=True, check=False,
      env={**os.environ, "JAXNORM_KERNELS": "cuda"})
  assert result.returncode != 0 and "JAXNORM_KERNELS='cuda' is not a kernel mode" in result.stderr


def test_environment_variable_forces_the_reference_path():
  code = ("import jaxnorm; from jaxnorm._src import dispatch, normalize; "
          "print(dispatch.mode(), dispatch.path('rms_rows', normalize.rms_rows) is "
          "normalize.rms_rows)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "JAXNORM_KERNELS": "reference"})
  assert result.stdout.split() == ["reference", "True"]


def test_pallas_mode_falls_back_to_the_xla_paths():
  """Kernels where registered (tests/test_pallas.py), the XLA paths elsewhere."""
  from jaxnorm._src.fast import pallas
  with jaxnorm.kernels("pallas"):
    assert dispatch.path("rms_rows", normalize.rms_rows) is pallas.rms_rows
    assert (dispatch.path("add_normalize_rows", normalize.add_normalize_rows)
            is pallas.add_normalize_rows)
    assert dispatch.path("shift_and_scale", normalize.shift_and_scale) is xla.shift_and_scale


@pytest.mark.parametrize("operation", ["add_normalize_rows", "add_rms_rows"])
@pytest.mark.parametrize("case", ["rows", "masked", "fused_rows"])
def test_fused_add_paths_fast_equal_reference(operation, case):
  """The fused residual add + norm: the XLA path equals the reference in (y, h) and gradients,
  and the dispatched operation is what ``add_layer_norm`` / ``add_rms_norm`` run."""
  shape, axes, where = CASES[case]
  with jax.enable_x64(True):
    rng = np.random.default_rng(9)
    x, residual = jnp.asarray(_data(shape, 0.0)), jnp.asarray(_data(shape, 1e4, seed=1))
    mask = None if where is None else jnp.asarray(where)
    scale = jnp.asarray(rng.standard_normal(shape[-1]) + 1)
    bias = jnp.asarray(rng.standard_normal(shape[-1]))
    options = dict(residual_dtype=jnp.float64, out_dtype=jnp.float64)

    def run(module, x, residual, scale, bias):
      if operation == "add_normalize_rows":
        return getattr(module, operation)(x, residual, mask, scale, bias, axes, 1e-6,
                                          **options)
      y, h = getattr(module, operation)(x, residual, mask, scale, axes, 1e-6, **options)
      return y + bias, h

    args = (x, residual, scale, bias)
    for g, w in zip(run(xla, *args), run(normalize, *args)):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10 * 1e4)
    cot = (jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(shape)))
    for fast, ref in zip(jax.vjp(functools.partial(run, xla), *args)[1](cot),
                         jax.vjp(functools.partial(run, normalize), *args)[1](cot)):
      np.testing.assert_allclose(fast, ref, rtol=1e-8, atol=1e-9)
    public = (jaxnorm.add_layer_norm(x, residual, scale, bias, where=mask, epsilon=1e-6)
              if operation == "add_normalize_rows" else
              jaxnorm.add_rms_norm(x, residual, scale, where=mask, epsilon=1e-6))
    np.testing.assert_array_equal(public[0] + (bias if operation == "add_rms_rows" else 0),
                                  run(xla, *args)[0])
    np.testing.assert_array_equal(public[1], run(xla, *args)[1])
