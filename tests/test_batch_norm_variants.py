"""Ghost batch norm and the Lp batch norms, pure and Linen, against float64 NumPy references."""
import functools
import math

import jax
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jnn
from tests import reference


def data(shape, offset=0.0, spread=3.0, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * spread + offset).astype(np.float32)


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


# ---------------------------------------------------------------------------------------------
# ghost batch norm

def ghost_reference(x, virtual_batch_size, where=None, epsilon=0.0):
  """Each consecutive block of ``virtual_batch_size`` examples standardized on its own (float64),
  and the running-statistics targets: the mean of all valid values and the pooled within-block
  variance sum_g n_g var_g / sum_g (n_g - 1)."""
  x = np.asarray(x, np.float64)
  valid = reference.mask_of(where, x.shape)
  axes = tuple(range(x.ndim - 1))
  y = np.empty_like(x)
  squares, dof = 0.0, 0.0
  for start in range(0, x.shape[0], virtual_batch_size):
    block = slice(start, start + virtual_batch_size)
    mean, var, count = reference.moments(x[block], axes, valid[block])
    y[block] = (x[block] - mean) / np.sqrt(var + epsilon)
    squares = squares + (count * var).ravel()
    dof = dof + np.maximum(count - 1, 0).ravel()
  mean, _, _ = reference.moments(x, axes, valid)
  return y, mean.ravel(), squares / dof


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("virtual_batch_size", [2, 3, 4])
def test_ghost_matches_float64_reference(use_jit, masked, virtual_batch_size):
  rng = np.random.default_rng(1)
  x = data((12, 5, 4), 1e3)
  where = rng.random((12, 5, 1)) < 0.7 if masked else None
  scale, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  running = jaxnorm.BatchStats(jnp.arange(4.0), jnp.full(4, 2.0))
  fn = functools.partial(jaxnorm.ghost_batch_norm, training=True, momentum=0.9,
                         virtual_batch_size=virtual_batch_size, epsilon=1e-5)
  y, new = maybe_jit(fn, use_jit)(x, running, scale, bias, where=where)
  ref, mean, pooled_var = ghost_reference(x, virtual_batch_size, where, 1e-5)
  assert reference.relative_error(y, ref * scale + bias, reference.mask_of(where, x.shape)) < 1e-5
  np.testing.assert_allclose(new.mean, 0.9 * np.arange(4) + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, 0.9 * 2 + 0.1 * pooled_var, rtol=1e-4)


def test_ghost_differs_from_batch_norm_and_whole_batch_equals_it():
  x = data((8, 3), 1.0)
  x[4:] += 10         # the second half of the batch sits elsewhere
  running = jaxnorm.init_batch_stats(3)
  y_bn, new_bn = jaxnorm.batch_norm(x, running, training=True)
  y_ghost, _ = jaxnorm.ghost_batch_norm(x, running, training=True, virtual_batch_size=4)
  assert np.max(np.abs(y_ghost - y_bn)) > 0.5
  for size in (None, 8):
    y, new = jaxnorm.ghost_batch_norm(x, running, training=True, virtual_batch_size=size)
    np.testing.assert_allclose(y, y_bn, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.mean, new_bn.mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, new_bn.var, rtol=1e-6)


def test_ghost_batch_that_does_not_divide_is_an_error_naming_the_fix():
  with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch of 6.*"
                                       r"\[2, 3, 6\].*mask="):
    jaxnorm.ghost_batch_norm(jnp.ones((6, 2)), None, training=True, virtual_batch_size=4)
  with pytest.raises(ValueError, match="at least 2 values per channel in each virtual batch"):
    jaxnorm.ghost_batch_norm(jnp.ones((6, 2)), None, training=True, virtual_batch_size=1)
  # evaluation takes any batch size
  y, _ = jaxnorm.ghost_batch_norm(jnp.ones((5, 2)), jaxnorm.init_batch_stats(2), training=False,
                                  virtual_batch_size=4)
  assert y.shape == (5, 2)


def test_ghost_pad_and_mask_equals_the_unpadded_blocks():
  x = data((6, 2), 2.0)
  padded = np.concatenate([x, np.full((2, 2), 1e6, np.float32)])
  where = np.arange(8)[:, None] < 6
  y, new = jaxnorm.ghost_batch_norm(padded, jaxnorm.init_batch_stats(2), training=True,
                                    virtual_batch_size=4, where=where, epsilon=0.0)
  ref, mean, pooled_var = ghost_reference(x, 4)     # blocks of 4 and 2
  assert reference.max_error(y[:6], ref) < 1e-5
  np.testing.assert_allclose(new.mean, 0.01 * mean, rtol=1e-5)
  np.testing.assert_allclose(new.var, 0.99 + 0.01 * pooled_var, rtol=1e-6)


def test_ghost_non_finite_block_leaves_the_channel_unchanged():
  x = data((8, 3))
  x[5, 1] = np.nan
  running = jaxnorm.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
  y, new = jaxnorm.ghost_batch_norm(x, running, training=True, virtual_batch_size=4)
  assert np.isfinite(y[:4]).all() and np.isnan(y[4:, 1]).all()
  np.testing.assert_array_equal([new.mean[1], new.var[1]], [2.0, 5.0])
  assert new.mean[0] != 1.0


def test_ghost_gradient_is_that_of_each_block_on_its_own():
  x = data((8, 3), 5.0, seed=2)
  w = np.random.default_rng(20).standard_normal((8, 3))

  def ghost_loss(x):
    y, _ = jaxnorm.ghost_batch_norm(x, None, training=True, virtual_batch_size=4)
    return jnp.sum(w * y)

  def block_loss(x):
    ys = [jaxnorm.batch_norm(x[i:i + 4], None, training=True)[0] for i in (0, 4)]
    return jnp.sum(w * jnp.concatenate(ys))

  np.testing.assert_allclose(jax.jit(jax.grad(ghost_loss))(x), jax.jit(jax.grad(block_loss))(x),
                             atol=1e-5)  # jit: one compile each, not one a primitive


@pytest.mark.parametrize("mapper", ["vmap", "pmap"])
def test_ghost_synchronized_across_8_devices_with_unequal_masks(mapper):
  """Virtual batch g is the g-th block of every device, pooled by count."""
  rng = np.random.default_rng(3)
  x = data((8, 4, 3), 50.0, seed=3)                # 8 devices, 2 blocks of 2 rows each
  where = rng.random((8, 4, 1)) < 0.5
  where[2] = False                                  # one device fully masked
  where[0] = True

  def per_device(x, where):
    return jaxnorm.ghost_batch_norm(x, jaxnorm.init_batch_stats(3), training=True,
                                    virtual_batch_size=2, where=where, axis_name="d",
                                    momentum=0.0)

  if mapper == "vmap":
    y, new = jax.jit(jax.vmap(per_device, axis_name="d"))(x, where)
  else:
    y, new = jax.pmap(per_device, axis_name="d", devices=jax.devices()[:8])(x, where)
  # reference: block g gathers rows 2g, 2g + 1 of every device
  blocks_x = x.reshape(8, 2, 2, 3).transpose(1, 0, 2, 3).reshape(2 * 16, 3)
  blocks_w = where.reshape(8, 2, 2, 1).transpose(1, 0, 2, 3).reshape(2 * 16, 1)
  ref, mean, pooled_var = ghost_reference(blocks_x, 16, blocks_w)
  ref = ref.reshape(2, 8, 2, 3).transpose(1, 0, 2, 3).reshape(8, 4, 3)
  assert reference.max_error(y, ref, reference.mask_of(where, x.shape)) < 1e-4
  for device in range(8):
    np.testing.assert_allclose(new.mean[device], mean, rtol=1e-6)
    np.testing.assert_allclose(new.var[device], pooled_var, rtol=1e-5)


def test_linen_ghost_batch_norm():
  x = data((8, 5, 3), 3.0)
  layer = jnn.GhostBatchNorm(virtual_batch_size=4, momentum=0.9)
  # init with a batch that does not divide, as Flax models often are (one example)
  variables = layer.init(jax.random.key(0), x[:1], use_running_average=False)
  assert set(variables["batch_stats"]) == {"mean", "var"}
  y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  params = variables["params"]
  y_ref, new = jaxnorm.ghost_batch_norm(x, jaxnorm.init_batch_stats(3), params["scale"],
                                        params["bias"], training=True, virtual_batch_size=4,
                                        momentum=0.9)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], new.mean)
  with pytest.raises(ValueError, match="must divide"):
    layer.apply(variables, x[:6], use_running_average=False, mutable=["batch_stats"])
  # virtual_batch_size=None is BatchNorm, with the same variables
  plain = jnn.BatchNorm(use_running_average=False)
  ghost_none = jnn.GhostBatchNorm(use_running_average=False)
  plain_vars = plain.init(jax.random.key(0), x)
  np.testing.assert_array_equal(ghost_none.apply(plain_vars, x, mutable=["batch_stats"])[0],
                                plain.apply(plain_vars, x, mutable=["batch_stats"])[0])


# ---------------------------------------------------------------------------------------------
# Lp batch norm

def lp_reference(x, axes, p, where=None, epsilon=0.0):
  """Centred by the batch mean, divided by sqrt(s_p^2 + eps), float64; also s_p^2 and count."""
  x = np.asarray(x, np.float64)
  valid = reference.mask_of(where, x.shape)
  mean, var, count = reference.moments(x, axes, valid)
  deviation = np.where(valid, np.abs(x - mean), 0)
  if p == 1:
    spread = np.sqrt(np.pi / 2) * deviation.sum(axis=axes, keepdims=True) / count
  elif p == 2:
    spread = np.sqrt(var)
  else:
    spread = deviation.max(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(spread ** 2 + epsilon), mean, spread ** 2, count


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("p", [1, math.inf])
def test_lp_matches_float64_reference(use_jit, masked, p):
  rng = np.random.default_rng(4)
  x = data((6, 5, 4), 1e4, seed=4)
  where = rng.random((6, 5, 1)) < 0.6 if masked else None
  scale, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  running = jaxnorm.BatchStats(jnp.arange(4.0), jnp.full(4, 2.0))
  fn = functools.partial(jaxnorm.lp_batch_norm, training=True, p=p, momentum=0.9, epsilon=1e-5)
  y, new = maybe_jit(fn, use_jit)(x, running, scale, bias, where=where)
  ref, mean, spread, count = lp_reference(x, (0, 1), p, where, 1e-5)
  assert reference.relative_error(y, ref * scale + bias, reference.mask_of(where, x.shape)) < 1e-5
  np.testing.assert_allclose(new.mean, 0.9 * np.arange(4) + 0.1 * mean.ravel(), rtol=1e-6)
  np.testing.assert_allclose(new.var, 0.9 * 2 + 0.1 * (spread * count / (count - 1)).ravel(),
                             rtol=1e-4)


def test_lp_2_is_batch_norm_exactly():
  x = data((6, 4), 2.0)
  where = np.random.default_rng(5).random((6, 1)) < 0.8
  running = jaxnorm.init_batch_stats(4)
  for training in (True, False):
    y, new = jaxnorm.lp_batch_norm(x, running, training=training, p=2, where=where)
    y_bn, new_bn = jaxnorm.batch_norm(x, running, training=training, where=where)
    np.testing.assert_array_equal(y, y_bn)
    np.testing.assert_array_equal(new.var, new_bn.var)
  layer = jnn.LpBatchNorm(use_running_average=False)
  plain = jnn.BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x)
  y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  y_bn, updates_bn = plain.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, y_bn)
  np.testing.assert_array_equal(updates["batch_stats"]["var"], updates_bn["batch_stats"]["var"])


def test_l1_spread_matches_the_standard_deviation_for_gaussians():
  """The sqrt(pi/2) factor (Hoffer et al. 2018): L1 output std about 1 on Gaussian data."""
  x = data((100_000, 2), 7.0, 2.0, seed=6)
  y, new = jaxnorm.lp_batch_norm(x, jaxnorm.init_batch_stats(2), training=True, p=1,
                                 momentum=0.0)
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), 0), 1.0, atol=0.01)
  np.testing.assert_allclose(new.var, 4.0, rtol=0.02)


@pytest.mark.parametrize("p", [1, math.inf])
def test_lp_gradients(p):
  x = jnp.asarray(data((7, 3), 2.0, seed=7))
  scale = jnp.array([1.0, -2.0, 0.5])
  w = np.random.default_rng(70).standard_normal((7, 3))

  def loss(x, scale):
    y, _ = jaxnorm.lp_batch_norm(x, None, scale, training=True, p=p)
    return jnp.sum(w * y)

  # against the float64 reference by central differences on one element (float64 check_grads:
  # test_check_grads_float64)
  x64 = np.asarray(x, np.float64)
  h, i, j = 1e-6, 3, 2

  def loss64(x64):
    return np.sum(w * lp_reference(x64, 0, p, epsilon=1e-5)[0] * np.asarray(scale))

  plus, minus = x64.copy(), x64.copy()
  plus[i, j] += h
  minus[i, j] -= h
  numeric = (loss64(plus) - loss64(minus)) / (2 * h)
  np.testing.assert_allclose(jax.grad(loss)(x, scale)[i, j], numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("p", [1, math.inf])
def test_lp_synchronized_across_8_devices_with_unequal_masks(p):
  rng = np.random.default_rng(8)
  x = data((8, 4, 3), 100.0, seed=8)
  where = np.zeros((8, 4, 1), bool)
  for device, n in enumerate([4, 1, 0, 2, 3, 4, 1, 2]):
    where[device, rng.permutation(4)[:n]] = True
  y, new = jax.jit(jax.vmap(lambda x, w: jaxnorm.lp_batch_norm(
      x, jaxnorm.init_batch_stats(3), training=True, p=p, where=w, axis_name="d", momentum=0.0),
      axis_name="d"))(x, where)
  ref, mean, spread, count = lp_reference(x.reshape(32, 3), 0, p, where.reshape(32, 1), 1e-5)
  assert reference.max_error(y.reshape(32, 3), ref, reference.mask_of(where.reshape(32, 1),
                                                                     (32, 3))) < 1e-4
  for device in range(8):
    np.testing.assert_allclose(new.mean[device], mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(new.var[device], (spread * count / (count - 1)).ravel(), rtol=1e-4)


def test_lp_unknown_p_is_an_error_naming_the_choices():
  with pytest.raises(ValueError, match=r"p=3 is not supported; use p=1.*p=2.*math.inf"):
    jaxnorm.lp_batch_norm(jnp.ones((4, 2)), None, training=True, p=3)
  y, _ = jaxnorm.lp_batch_norm(data((4, 2)), None, training=True, p="inf")
  assert y.shape == (4, 2)


def test_linen_lp_batch_norm_trains_and_evaluates():
  x = data((16, 3), 4.0)
  layer = jnn.LpBatchNorm(p=1, momentum=0.5)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1)
  _, updates = jax.jit(functools.partial(layer.apply, use_running_average=False,
                                         mutable=["batch_stats"]))(variables, x)
  _, new = jaxnorm.lp_batch_norm(x, jaxnorm.init_batch_stats(3), training=True, p=1,
                                 momentum=0.5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], new.var, rtol=1e-6)
  y_eval = layer.apply({**variables, **updates}, x, use_running_average=True)
  np.testing.assert_allclose(y_eval, (x - new.mean) / np.sqrt(new.var + 1e-5), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_ghost_one_valid_value_per_virtual_batch_still_moves_the_mean(use_jit):
  """8 rows in pairs, one valid row per pair: 4 valid values move the running mean as batch
  norm's; no pair has a degree of freedom, so the variance stays."""
  x = np.arange(8.0, dtype=np.float32)[:, None] + np.array([0.0, 10.0], np.float32)
  where = (np.arange(8) % 2 == 1)[:, None]          # rows 1, 3, 5, 7
  running = jaxnorm.BatchStats(jnp.array([0.0, 0.0]), jnp.array([1.0, 3.0]))
  fn = maybe_jit(functools.partial(jaxnorm.ghost_batch_norm, training=True, virtual_batch_size=2,
                                   momentum=0.0), use_jit)
  _, new = fn(x, running, where=where)
  _, new_bn = jaxnorm.batch_norm(x, running, training=True, momentum=0.0, where=where)
  valid = x[where[:, 0]].astype(np.float64)
  np.testing.assert_allclose(new.mean, valid.mean(0), rtol=1e-6)      # 4 and 14
  np.testing.assert_allclose(new.mean, new_bn.mean, rtol=1e-6)
  np.testing.assert_array_equal(new.var, running.var)
  # two pairs with both rows valid: the variance moves to their pooled within-pair variance
  both = where.copy()
  both[0] = both[4] = True
  _, new = fn(x, running, where=both)
  _, mean, pooled_var = ghost_reference(x, 2, both, 1e-5)
  np.testing.assert_allclose(new.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, pooled_var, rtol=1e-5)


@pytest.mark.parametrize("call", [
    lambda x, running: jaxnorm.ghost_batch_norm(x, running, training=False, virtual_batch_size=2),
    lambda x, running: jaxnorm.lp_batch_norm(x, running, training=False, p=1),
    lambda x, running: jaxnorm.lp_batch_norm(x, running, training=False, p=math.inf),
])
def test_evaluation_is_batch_norm_evaluation(call, monkeypatch):
  """The evaluation branch lives once, in the batch-norm skeleton: the variants call it."""
  from jaxnorm._src import batch_norm as bn  # pylint: disable=import-outside-toplevel
  calls = []
  original = bn.batch_norm_family

  def recorded(*args, **kwargs):
    calls.append(kwargs["training"])
    return original(*args, **kwargs)

  monkeypatch.setattr(bn, "batch_norm_family", recorded)
  x = data((6, 3), 2.0)
  running = jaxnorm.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
  y, same = call(x, running)
  assert calls == [False] and same is running
  np.testing.assert_array_equal(y, jaxnorm.batch_norm(x, running, training=False)[0])


# ---------------------------------------------------------------------------------------------
# float64 gradients and random shapes and masks

GRADIENT_CASES = {
    "ghost": lambda x, s, b, where: jaxnorm.ghost_batch_norm(
        x, None, s, b, training=True, virtual_batch_size=2, where=where)[0],
    "ghost_running": lambda x, s, b, where: jaxnorm.ghost_batch_norm(
        x, jaxnorm.init_batch_stats(4, jnp.float64), s, b, training=True,
        virtual_batch_size=3, where=where)[0],
    "lp_1": lambda x, s, b, where: jaxnorm.lp_batch_norm(
        x, None, s, b, training=True, p=1, where=where)[0],
    "lp_inf": lambda x, s, b, where: jaxnorm.lp_batch_norm(
        x, None, s, b, training=True, p=math.inf, where=where)[0],
    "ghost_eval": lambda x, s, b, where: jaxnorm.ghost_batch_norm(
        x, jaxnorm.BatchStats(jnp.full(4, 3.0), jnp.full(4, 2.0)), s, b, training=False,
        virtual_batch_size=2)[0],
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_check_grads_float64(name, masked):
  rng = np.random.default_rng(17)
  where = None
  if masked:
    where = rng.random((6, 5, 1)) < 0.6
    where[::2, :2] = True  # at least two valid values in every virtual batch
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((6, 5, 4)) * 2 + 3, jnp.float64)
    scale = jnp.asarray(rng.standard_normal(4) + 1, jnp.float64)
    bias = jnp.asarray(rng.standard_normal(4), jnp.float64)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float64)
    fn = GRADIENT_CASES[name]
    loss = jax.jit(lambda x, s, b: jnp.sum(weights * fn(x, s, b, where) ** 2))
    check_grads(loss, (x, scale, bias), order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


@st.composite
def batches_and_masks(draw):
  """A batch of virtual batches of 2 to 4 examples, 1 to 3 channels, and a mask (or None) that
  keeps the first two examples of every virtual batch valid."""
  virtual_batch_size = draw(st.integers(2, 4))
  groups = draw(st.integers(1, 3))
  length, channels = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  seed = draw(st.integers(0, 2**16))
  offset = draw(st.sampled_from([0.0, 100.0, 1e4]))
  shape = (groups * virtual_batch_size, length, channels)
  x = data(shape, offset, seed=seed)
  where = None
  if draw(st.booleans()):
    where = np.random.default_rng(seed + 1).random(shape[:2] + (1,)) < 0.5
    where[np.arange(shape[0]) % virtual_batch_size < 2] = True
  return x, where, virtual_batch_size


@settings(max_examples=10, deadline=None)
@given(batches_and_masks())
def test_ghost_random_shapes_and_masks_match_float64_reference(case):
  x, where, virtual_batch_size = case
  channels = x.shape[-1]
  running = jaxnorm.BatchStats(jnp.zeros(channels), jnp.ones(channels))
  # under jit: one compile a shape, where eager dispatch compiles every primitive for each new
  # shape (the eager path is in test_ghost_matches_float64_reference)
  y, new = jax.jit(functools.partial(
      jaxnorm.ghost_batch_norm, training=True, momentum=0.5, epsilon=1e-5,
      virtual_batch_size=virtual_batch_size))(x, running, where=where)
  ref, mean, pooled_var = ghost_reference(x, virtual_batch_size, where, 1e-5)
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-4
  np.testing.assert_allclose(new.mean, 0.5 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, 0.5 + 0.5 * pooled_var, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(batches_and_masks(), st.sampled_from([1, math.inf]))
def test_lp_random_shapes_and_masks_match_float64_reference(case, p):
  x, where, _ = case
  channels = x.shape[-1]
  running = jaxnorm.BatchStats(jnp.zeros(channels), jnp.ones(channels))
  # under jit, as above (the eager path is in test_lp_matches_float64_reference)
  y, new = jax.jit(functools.partial(jaxnorm.lp_batch_norm, training=True, p=p, momentum=0.5,
                                     epsilon=1e-5))(x, running, where=where)
  ref, mean, spread, count = lp_reference(x, (0, 1), p, where, 1e-5)
  assert reference.relative_error(y, ref, reference.mask_of(where, x.shape)) < 1e-4
  np.testing.assert_allclose(new.mean, 0.5 * mean.ravel(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, 0.5 + 0.5 * (spread * count / (count - 1)).ravel(),
                             rtol=1e-4)
