"""jaxnorm.batch_renorm, renorm_schedule and jaxnorm.linen.BatchRenorm vs float64 references."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jnn
from tests import reference

ROOT = Path(__file__).resolve().parents[1]


def data(shape, offset=0.0, spread=3.0, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * spread + offset).astype(np.float32)


def renorm_reference(x, running_mean, running_var, axes, *, rmax, dmax, epsilon, where=None,
                     scale=1.0, bias=0.0, momentum=0.99):
  """Ioffe (2017), algorithm 1, in float64: output, r, d and the next running mean and var."""
  mean, var, count = reference.moments(x, axes, where)
  sigma_batch = np.sqrt(var + epsilon)
  sigma = np.sqrt(np.asarray(running_var, np.float64) + epsilon)
  r = np.clip(sigma_batch / sigma, 1 / rmax, rmax)
  d = np.clip((mean - np.asarray(running_mean, np.float64)) / sigma, -dmax, dmax)
  y = ((np.asarray(x, np.float64) - mean) / sigma_batch * r + d) * scale + bias
  unbiased = var * count / (count - 1)
  new_mean = momentum * np.asarray(running_mean, np.float64) + (1 - momentum) * mean
  new_var = momentum * np.asarray(running_var, np.float64) + (1 - momentum) * unbiased
  return y, r, d, new_mean.ravel(), new_var.ravel()


CASES = {
    # running statistics close to the batch's: r and d inside their clips
    "unclipped": (np.array([19.0, 21.0, 20.5, 19.5]), np.array([8.0, 10.0, 9.0, 11.0]), 3.0, 5.0),
    # far: r at 1/rmax or rmax, d at -dmax or dmax
    "clipped": (np.array([0.0, 40.0, 20.0, 20.0]), np.array([900.0, 0.1, 1e-3, 50.0]), 2.0, 0.5),
}


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_matches_float64_reference(use_jit, masked, case):
  rng = np.random.default_rng(1)
  running_mean, running_var, rmax, dmax = CASES[case]
  x = data((6, 5, 4), 20.0)
  where = rng.random((6, 5, 1)) < 0.6 if masked else None
  scale, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  running = jaxnorm.RenormStats(jnp.asarray(running_mean, jnp.float32),
                                jnp.asarray(running_var, jnp.float32), jnp.array(7, jnp.int32))
  fn = functools.partial(jaxnorm.batch_renorm, training=True, rmax=rmax, dmax=dmax,
                         momentum=0.9, epsilon=1e-3)
  y, new = (jax.jit(fn) if use_jit else fn)(x, running, scale, bias, where=where)
  ref, r, d, new_mean, new_var = renorm_reference(
      x, running_mean, running_var, (0, 1), rmax=rmax, dmax=dmax, epsilon=1e-3, where=where,
      scale=scale, bias=bias, momentum=0.9)
  if case == "clipped":   # the case really reaches every clip
    np.testing.assert_allclose(np.sort(r.ravel())[[0, -1]], [1 / rmax, rmax])
    np.testing.assert_allclose(np.sort(d.ravel())[[0, -1]], [-dmax, dmax])
  else:
    assert np.all((r > 1 / rmax) & (r < rmax)) and np.all(np.abs(d) < dmax)
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-5
  np.testing.assert_allclose(new.mean, new_mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, new_var, rtol=1e-5)
  assert new.step.dtype == jnp.int32 and int(new.step) == 8


def test_unclipped_training_output_equals_evaluation_output():
  """Inside the clips, renorm's training output is the running-statistics normalization."""
  x = data((64, 3), 5.0)
  running = jaxnorm.RenormStats(jnp.array([4.0, 5.0, 6.0]), jnp.array([7.0, 9.0, 11.0]),
                                jnp.array(0, jnp.int32))
  y_train, _ = jaxnorm.batch_renorm(x, running, training=True, rmax=100.0, dmax=100.0)
  y_eval, same = jaxnorm.batch_renorm(x, running, training=False)
  assert same is running
  np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)


def test_rmax_1_dmax_0_equals_batch_norm_exactly():
  x = data((6, 5, 4), 1e3)
  running = jaxnorm.RenormStats(jnp.arange(4.0), jnp.full(4, 2.0), jnp.array(0, jnp.int32))
  scale, bias = jnp.linspace(0.5, 2, 4), jnp.linspace(-1, 1, 4)
  where = np.random.default_rng(2).random((6, 5, 1)) < 0.7
  for fn in (lambda f: f, jax.jit):
    y, new = fn(functools.partial(jaxnorm.batch_renorm, training=True, rmax=1.0, dmax=0.0))(
        x, running, scale, bias, where=where)
    y_bn, new_bn = fn(functools.partial(jaxnorm.batch_norm, training=True))(
        x, jaxnorm.BatchStats(running.mean, running.var), scale, bias, where=where)
    np.testing.assert_array_equal(y, y_bn)
    np.testing.assert_array_equal(new.mean, new_bn.mean)
    np.testing.assert_array_equal(new.var, new_bn.var)


def test_linen_rmax_1_dmax_0_equals_batch_norm_over_training_steps():
  batches = [data((8, 3, 4), 2.0, seed=s) for s in range(3)]
  renorm = jnn.BatchRenorm(momentum=0.8, rmax=1.0, dmax=0.0)
  plain = jnn.BatchNorm(momentum=0.8)
  renorm_vars = renorm.init(jax.random.key(0), batches[0], use_running_average=False)
  plain_vars = plain.init(jax.random.key(0), batches[0], use_running_average=False)

  @jax.jit
  def step(renorm_vars, plain_vars, x):
    y, renorm_updates = renorm.apply(renorm_vars, x, use_running_average=False,
                                     mutable=["batch_stats"])
    y_bn, plain_updates = plain.apply(plain_vars, x, use_running_average=False,
                                      mutable=["batch_stats"])
    return y, y_bn, {**renorm_vars, **renorm_updates}, {**plain_vars, **plain_updates}

  for x in batches:
    y, y_bn, renorm_vars, plain_vars = step(renorm_vars, plain_vars, x)
    np.testing.assert_array_equal(y, y_bn)
    for name in ("mean", "var"):
      np.testing.assert_array_equal(renorm_vars["batch_stats"][name],
                                    plain_vars["batch_stats"][name])
  assert int(renorm_vars["batch_stats"]["step"]) == 3
  evaluate = functools.partial(renorm.apply, use_running_average=True)
  np.testing.assert_array_equal(evaluate(renorm_vars, batches[0]),
                                plain.apply(plain_vars, batches[0], use_running_average=True))


def test_gradients_equal_float64_analytic_with_r_and_d_constant():
  """r and d carry no gradient: the gradient is batch norm's, with dL/dx_hat scaled by r."""
  rng = np.random.default_rng(30)
  x = data((16, 3), 3.0, seed=3)
  w = rng.standard_normal((16, 3))
  scale = np.array([0.5, 1.5, -2.0], np.float32)
  bias = np.array([0.1, 0.2, 0.3], np.float32)
  running_mean, running_var, rmax, dmax, eps = np.array([2.0, 3.0, 9.0]), np.array(
      [9.0, 90.0, 1.0]), 2.0, 1.0, 1e-3
  running = jaxnorm.RenormStats(jnp.asarray(running_mean, jnp.float32),
                                jnp.asarray(running_var, jnp.float32), jnp.array(0, jnp.int32))

  def loss(x, scale, bias):
    y, _ = jaxnorm.batch_renorm(x, running, scale, bias, training=True, rmax=rmax, dmax=dmax,
                                epsilon=eps)
    return jnp.sum(w * y)

  dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  _, r, d, _, _ = renorm_reference(x, running_mean, running_var, 0, rmax=rmax, dmax=dmax,
                                   epsilon=eps)
  assert np.any(r == rmax) and np.any((r > 1 / rmax) & (r < rmax)), "r must vary and clip"
  x64 = x.astype(np.float64)
  mean, var, _ = reference.moments(x64, 0)
  sigma = np.sqrt(var + eps)
  x_hat = (x64 - mean) / sigma
  g = w * scale * r                               # dL/dx_hat
  expected_dx = (g - g.mean(0) - x_hat * (g * x_hat).mean(0)) / sigma
  np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dscale, np.sum(w * (x_hat * r + d), 0), rtol=1e-4)
  np.testing.assert_allclose(dbias, w.sum(0), rtol=1e-5)

  # and a float64 central difference of the same function with r and d frozen
  def frozen(x64):
    m, v, _ = reference.moments(x64, 0)
    return np.sum(w * (((x64 - m) / np.sqrt(v + eps) * r + d) * scale + bias))

  h, i, j = 1e-5, 5, 1
  plus, minus = x64.copy(), x64.copy()
  plus[i, j] += h
  minus[i, j] -= h
  np.testing.assert_allclose(dx[i, j], (frozen(plus) - frozen(minus)) / (2 * h), rtol=1e-4)


def test_evaluation_and_init_leave_state_alone():
  x = data((5, 3), 1.0)
  layer = jnn.BatchRenorm()
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  stats = variables["batch_stats"]
  np.testing.assert_array_equal(stats["mean"], 0)
  np.testing.assert_array_equal(stats["var"], 1)
  assert stats["step"].dtype == jnp.int32 and int(stats["step"]) == 0
  assert set(variables["params"]) == {"scale", "bias"}
  y, updates = layer.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["step"]) == 0
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
  # a model initialized with a single example, as Flax models often are
  single = jnn.BatchRenorm(use_running_average=False).init(jax.random.key(0), x[:1])
  assert int(single["batch_stats"]["step"]) == 0


def test_non_finite_batch_leaves_running_statistics_unchanged_and_counts_the_step():
  x = data((8, 3))
  x[2, 1] = np.nan
  running = jaxnorm.RenormStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]),
                                jnp.array(4, jnp.int32))
  y, new = jaxnorm.batch_renorm(x, running, training=True, momentum=0.5)
  assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
  np.testing.assert_array_equal(new.mean[1], 2.0)
  np.testing.assert_array_equal(new.var[1], 5.0)
  assert new.mean[0] != 1.0 and int(new.step) == 5


def test_missing_running_state_is_an_error_naming_the_fix():
  with pytest.raises(ValueError, match="init_renorm_stats"):
    jaxnorm.batch_renorm(jnp.ones((4, 2)), None, training=True)
  with pytest.raises(ValueError, match="at least 2 values per channel"):
    jaxnorm.batch_renorm(jnp.ones((1, 2)), jaxnorm.init_renorm_stats(2), training=True)
  with pytest.raises(ValueError, match="rmax=0.5 must be at least 1"):
    jaxnorm.batch_renorm(jnp.ones((4, 2)), jaxnorm.init_renorm_stats(2), training=True, rmax=0.5)
  with pytest.raises(ValueError, match="dmax=-1 must be at least 0"):
    jaxnorm.batch_renorm(jnp.ones((4, 2)), jaxnorm.init_renorm_stats(2), training=True, dmax=-1)


def test_renorm_schedule_follows_the_paper_recipe():
  schedule = jaxnorm.renorm_schedule(5000, 35000, dmax_relax_steps=20000)
  steps = np.array([0, 4999, 5000, 15000, 25000, 40000, 10**6])
  rmax = np.asarray(jax.jit(jax.vmap(schedule.rmax))(steps))
  dmax = np.asarray(jax.jit(jax.vmap(schedule.dmax))(steps))
  np.testing.assert_allclose(rmax, [1, 1, 1, 1 + 2 * 10 / 35, 1 + 2 * 20 / 35, 3, 3], rtol=1e-6)
  np.testing.assert_allclose(dmax, [0, 0, 0, 2.5, 5, 5, 5], rtol=1e-6)
  jump = jaxnorm.renorm_schedule(3, 0, rmax=2.0, dmax=1.0)
  assert [float(jump.rmax(t)) for t in range(5)] == [1, 1, 1, 2, 2]
  with pytest.raises(ValueError, match="rmax >= 1"):
    jaxnorm.renorm_schedule(1, 1, rmax=0.5)


def probe_batch(seed):
  """A batch with std 100 and mean 50 per channel: against running stats (0, 1), r and d sit at
  their clips, so the output's std is rmax and its mean dmax."""
  x = np.random.default_rng(seed).standard_normal((64, 2))
  x = (x - x.mean(0)) / x.std(0) * 100 + 50
  return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["renorm_schedule", "optax"])
def test_schedules_follow_the_step_counter_inside_a_jitted_train_step(kind):
  if kind == "renorm_schedule":
    schedule = jaxnorm.renorm_schedule(warmup_steps=2, relax_steps=4, rmax=3.0, dmax=2.0)
    rmax_fn, dmax_fn = schedule
  else:
    rmax_fn = optax.linear_schedule(1.0, 4.0, transition_steps=6)
    dmax_fn = optax.piecewise_constant_schedule(0.5, {3: 2.0})
  # momentum 1: the running statistics stay at (0, 1), only the step moves
  layer = jnn.BatchRenorm(use_running_average=False, momentum=1.0, epsilon=1e-6,
                          rmax=rmax_fn, dmax=dmax_fn)
  variables = layer.init(jax.random.key(0), probe_batch(0))
  traces = []

  @jax.jit
  def train_step(variables, x):
    traces.append(1)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    return y, {**variables, **updates}

  for t in range(9):
    y, variables = train_step(variables, probe_batch(t))
    assert int(variables["batch_stats"]["step"]) == t + 1
    np.testing.assert_allclose(np.std(np.asarray(y, np.float64), 0), float(rmax_fn(t)),
                               rtol=1e-4)
    np.testing.assert_allclose(np.mean(np.asarray(y, np.float64), 0), float(dmax_fn(t)),
                               atol=1e-4)
  assert len(traces) == 1, "the step counter must not retrace the train step"

  # the same under lax.scan, the pure function directly
  def scan_step(running, x):
    y, running = jaxnorm.batch_renorm(x, running, training=True, rmax=rmax_fn, dmax=dmax_fn,
                                      momentum=1.0, epsilon=1e-6)
    return running, (jnp.std(y, 0), jnp.mean(y, 0))

  xs = np.stack([probe_batch(t) for t in range(9)])
  final, (stds, means) = jax.jit(lambda xs: jax.lax.scan(
      scan_step, jaxnorm.init_renorm_stats(2), xs))(xs)
  assert int(final.step) == 9
  np.testing.assert_allclose(stds[:, 0], [float(rmax_fn(t)) for t in range(9)], rtol=1e-4)
  np.testing.assert_allclose(means[:, 0], [float(dmax_fn(t)) for t in range(9)], atol=1e-4)


def sync_case():
  """8 devices of 4 rows with unequal masks: 4, 1, 0, 2, 3, 4, 1 and 2 valid rows."""
  rng = np.random.default_rng(7)
  x = data((8, 4, 3), 100.0, seed=7)
  valid = [4, 1, 0, 2, 3, 4, 1, 2]
  where = np.zeros((8, 4, 1), bool)
  for device, n in enumerate(valid):
    where[device, rng.permutation(4)[:n]] = True
  return x, where


@pytest.mark.parametrize("mapper", ["vmap", "pmap"])
def test_synchronized_across_8_devices_with_unequal_masks(mapper):
  x, where = sync_case()
  running = jaxnorm.RenormStats(jnp.array([99.0, 101.0, 95.0]), jnp.array([4.0, 16.0, 9.0]),
                                jnp.array(0, jnp.int32))

  def per_device(x, where):
    return jaxnorm.batch_renorm(x, running, training=True, rmax=1.5, dmax=0.2, where=where,
                                axis_name="devices", momentum=0.9)

  if mapper == "vmap":
    y, new = jax.jit(jax.vmap(per_device, axis_name="devices"))(x, where)
  else:
    assert len(jax.devices()) >= 8
    y, new = jax.pmap(per_device, axis_name="devices", devices=jax.devices()[:8])(x, where)
  flat_x, flat_where = x.reshape(32, 3), where.reshape(32, 1)
  ref, r, d, new_mean, new_var = renorm_reference(
      flat_x, running.mean, running.var, 0, rmax=1.5, dmax=0.2, epsilon=1e-5, where=flat_where,
      momentum=0.9)
  assert np.any(np.abs(d) == 0.2) and np.any(np.abs(d) < 0.2)
  assert reference.relative_error(y.reshape(32, 3), ref, reference.mask_of(flat_where, (32, 3))
                                  ) < 1e-5
  for device in range(8):
    np.testing.assert_allclose(new.mean[device], new_mean, rtol=1e-6)
    np.testing.assert_allclose(new.var[device], new_var, rtol=1e-5)
  np.testing.assert_array_equal(new.step, 1)


def test_linen_axis_name_under_vmap_matches_the_pooled_batch():
  x, where = sync_case()
  layer = jnn.BatchRenorm(use_running_average=False, axis_name="devices", rmax=2.0, dmax=1.0)
  variables = layer.init(jax.random.key(0), x[0])
  y, updates = jax.jit(jax.vmap(
      lambda x, w: layer.apply(variables, x, mask=w, mutable=["batch_stats"]),
      axis_name="devices"))(x, where)
  full = jnn.BatchRenorm(use_running_average=False, rmax=2.0, dmax=1.0)
  y_full, updates_full = jax.jit(functools.partial(full.apply, mutable=["batch_stats"]))(
      variables, x.reshape(32, 3), mask=where.reshape(32, 1))
  valid = reference.mask_of(where.reshape(32, 1), (32, 3))
  assert reference.max_error(y.reshape(32, 3), y_full, valid) < 1e-4
  for name in ("mean", "var"):
    np.testing.assert_allclose(updates["batch_stats"][name][3], updates_full["batch_stats"][name],
                               rtol=1e-5)


def test_half_precision_input_keeps_float32_statistics():
  x = data((16, 4), 300.0, 1.0).astype(jnp.bfloat16)
  y, new = jaxnorm.batch_renorm(x, jaxnorm.init_renorm_stats(4), training=True)
  assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
  mean, _, _ = reference.moments(np.asarray(x, np.float32), 0)
  np.testing.assert_allclose(new.mean, 0.01 * mean.ravel(), rtol=1e-5)


def test_small_batches_example_runs_in_quick_mode():
  # one device; XLA's lowest optimization level: the quick run's time is mostly compiling
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",
         "JAX_NUM_CPU_DEVICES": "1"}
  result = subprocess.run([sys.executable, str(ROOT / "examples" / "small_batches.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "BatchRenorm" in result.stdout and "ghost" in result.stdout.lower()


@pytest.mark.parametrize("rmax,dmax,bad", [
    (np.float32(0.5), 5.0, "rmax=0.5 must be at least 1"),
    (np.array(0.5), 5.0, "rmax=0.5 must be at least 1"),
    (3.0, np.float32(-1.0), "dmax=-1.0 must be at least 0"),
    (3.0, np.int64(-2), "dmax=-2 must be at least 0"),
])
def test_numpy_clips_are_checked_too(rmax, dmax, bad):
  with pytest.raises(ValueError, match=bad):
    jaxnorm.batch_renorm(jnp.ones((4, 2)), jaxnorm.init_renorm_stats(2), training=True,
                         rmax=rmax, dmax=dmax)


def test_batch_stats_without_a_step_is_an_error_naming_init_renorm_stats():
  with pytest.raises(ValueError, match=r"needs a RenormStats .* got BatchStats; start from "
                                       r"jaxnorm.init_renorm_stats\(num_features\)"):
    jaxnorm.batch_renorm(jnp.ones((4, 2)), jaxnorm.init_batch_stats(2), training=True)
  # evaluation reads only mean and var
  y, _ = jaxnorm.batch_renorm(jnp.ones((4, 2)), jaxnorm.init_batch_stats(2), training=False)
  np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_evaluation_is_batch_norm_evaluation(monkeypatch):
  """The evaluation branch lives once, in the batch-norm skeleton: batch_renorm calls it."""
  from jaxnorm._src import batch_norm as bn  # pylint: disable=import-outside-toplevel
  calls = []
  original = bn.batch_norm_family

  def recorded(*args, **kwargs):
    calls.append(kwargs["training"])
    return original(*args, **kwargs)

  monkeypatch.setattr(bn, "batch_norm_family", recorded)
  x = data((6, 3), 2.0)
  running = jaxnorm.RenormStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]),
                                jnp.array(3, jnp.int32))
  y, same = jaxnorm.batch_renorm(x, running, jnp.full(3, 2.0), jnp.ones(3), training=False)
  assert calls == [False] and same is running
  np.testing.assert_array_equal(y, jaxnorm.batch_norm(x, jaxnorm.BatchStats(running.mean, running.var),
                                            jnp.full(3, 2.0), jnp.ones(3), training=False)[0])


# r and d frozen: rmax=1, dmax=0 (batch norm), or every channel at its clips (the running
# statistics far from the batch's), where a small change of x does not move them.
FROZEN_CASES = {
    "rmax_1_dmax_0": (jnp.array([0.5, 1.0, 3.0, -2.0]), jnp.array([0.5, 2.0, 9.0, 1.0]), 1.0,
                      0.0),
    "clipped": (jnp.array([-50.0, 60.0, -70.0, 80.0]), jnp.array([1e4, 1e-2, 1e4, 1e-2]), 2.0,
                0.5),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", sorted(FROZEN_CASES))
def test_check_grads_float64_with_r_and_d_frozen(case, masked):
  rng = np.random.default_rng(27)
  running_mean, running_var, rmax, dmax = FROZEN_CASES[case]
  where = None
  if masked:
    where = rng.random((6, 5, 1)) < 0.6
    where[:, :2] = True
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((6, 5, 4)) * 2 + 3, jnp.float64)
    scale = jnp.asarray(rng.standard_normal(4) + 1, jnp.float64)
    bias = jnp.asarray(rng.standard_normal(4), jnp.float64)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float64)
    running = jaxnorm.RenormStats(running_mean.astype(jnp.float64),
                                  running_var.astype(jnp.float64), jnp.array(0, jnp.int32))
    _, r, d, _, _ = renorm_reference(x, running_mean, running_var, (0, 1), rmax=rmax, dmax=dmax,
                                     epsilon=1e-5, where=where)
    np.testing.assert_allclose(np.abs(np.log(r)), np.log(rmax))   # every r and d at a clip
    np.testing.assert_allclose(np.abs(d), dmax)

    def loss(x, s, b):
      y, _ = jaxnorm.batch_renorm(x, running, s, b, training=True, rmax=rmax, dmax=dmax,
                                  where=where)
      return jnp.sum(weights * y ** 2)

    check_grads(jax.jit(loss), (x, scale, bias), order=1, modes=["fwd", "rev"], atol=1e-5,
                rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(2, 9), length=st.integers(1, 3), channels=st.integers(1, 3),
       seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 100.0, 1e4]),
       masked=st.booleans(), rmax=st.sampled_from([1.0, 1.5, 3.0]),
       dmax=st.sampled_from([0.0, 0.5, 5.0]))
def test_random_shapes_and_masks_match_float64_reference(batch, length, channels, seed, offset,
                                                         masked, rmax, dmax):
  rng = np.random.default_rng(seed)
  x = data((batch, length, channels), offset, seed=seed)
  where = None
  if masked:
    where = rng.random((batch, length, 1)) < 0.5
    where[:2, 0] = True  # at least two valid values per channel
  running_mean = (offset + rng.standard_normal(channels) * 3).astype(np.float32)
  running_var = (rng.random(channels) * 20 + 0.1).astype(np.float32)
  running = jaxnorm.RenormStats(jnp.asarray(running_mean), jnp.asarray(running_var),
                                jnp.array(2, jnp.int32))
  # under jit: one compile a shape, where eager dispatch compiles every primitive for each new
  # shape (the eager path is in test_training_matches_float64_reference)
  fn = jax.jit(functools.partial(jaxnorm.batch_renorm, training=True, rmax=rmax, dmax=dmax,
                                 momentum=0.5, epsilon=1e-3))
  y, new = fn(x, running, where=where)
  ref, _, _, new_mean, new_var = renorm_reference(
      x, running_mean, running_var, (0, 1), rmax=rmax, dmax=dmax, epsilon=1e-3, where=where,
      momentum=0.5)
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-4
  np.testing.assert_allclose(new.mean, new_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var, new_var, rtol=1e-4)
  assert int(new.step) == 3


def test_batch_norm_checkpoint_loads_into_batch_renorm():
  """A BatchNorm checkpoint (no batch_stats/step) evaluates in BatchRenorm as in BatchNorm, and
  training it from there starts the step at 0."""
  x = data((8, 3), 5.0)
  variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  _, updates = jnn.BatchNorm(use_running_average=False).apply(variables, x,
                                                              mutable=["batch_stats"])
  checkpoint = {**variables, **updates}
  y_renorm = jnn.BatchRenorm(use_running_average=True).apply(checkpoint, x)
  y_bn = jnn.BatchNorm(use_running_average=True).apply(checkpoint, x)
  np.testing.assert_array_equal(y_renorm, y_bn)
  _, trained = jnn.BatchRenorm(use_running_average=False).apply(checkpoint, x,
                                                                mutable=["batch_stats"])
  assert int(trained["batch_stats"]["step"]) == 1
