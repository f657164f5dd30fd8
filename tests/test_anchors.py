"""Regression tests for the defects measured in ANCHORS.md: jaxnorm must not have them.

Where it is cheap, a test beside each shows the defect in flax (or jax.nn), so that it is known
to have teeth: the same input really does break the usual implementation. Those tests assert what
flax should do and are marked ``xfail(strict=False)`` with the defect of the pinned version
(constraints.txt) as the reason: today they fail as expected, and an upstream fix makes them
pass (XPASS) without failing the suite. The jaxnorm assertions are ordinary tests.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
import jaxnorm.linen as jnn
from tests import reference

FLAX = "flax 0.12.8 defect"  # the version in constraints.txt; these xfail reasons name it


def flax_defect(what, raises=AssertionError):
  """Marks a test asserting what flax should do: today it fails, for ``what``, with ``raises``.

  Non-strict, so that an upstream fix passes (XPASS) without failing the suite; ``raises`` keeps
  any other error (a mistake in the test itself) a failure.
  """
  return pytest.mark.xfail(strict=False, raises=raises, reason=f"{FLAX}: {what}")


def far_data(shape, offset, seed=0, dtype=np.float32):
  return (np.random.default_rng(seed).standard_normal(shape) + offset).astype(dtype)


# --- fast variance far from zero ---------------------------------------------------------------

def test_batch_norm_at_offset_1e4_has_output_std_1():
  x = far_data((256, 64), 1e4)
  y, updates = jnn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(y)) - 1) < 1e-3
  assert reference.max_error(y, reference.standardize(x, 0, epsilon=1e-5)) < 1e-4
  # The running variance stays right (haiku's went negative at this offset).
  _, state = jnn.BatchNorm(use_running_average=False, momentum=0.0).apply(
      updates, x, mutable=["batch_stats"])
  np.testing.assert_allclose(state["batch_stats"]["var"], x.astype(np.float64).var(0, ddof=1),
                             rtol=1e-4)


@flax_defect("BatchNorm's fast variance E[x^2] - E[x]^2 cancels at offset 1e4: output std "
             "about 230 here (ANCHORS.md: 253)")
def test_flax_batch_norm_at_offset_1e4_has_output_std_1():
  x = far_data((256, 64), 1e4)
  flax_y, _ = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(flax_y)) - 1) < 1e-2


@pytest.mark.xfail(strict=False, raises=AssertionError,
                   reason="jax 0.10.2 defect: jax.nn.standardize's variance E[x^2] - E[x]^2 "
                   "cancels at offset 1e4: output std about 230")
def test_jax_nn_standardize_at_offset_1e4_has_output_std_1():
  x = far_data((256, 64), 1e4)
  assert abs(float(jnp.std(jax.nn.standardize(x, axis=0))) - 1) < 1e-2


def test_layer_norm_at_offset_1e4_has_output_std_1():
  x = far_data((8, 4096), 1e4)
  y, _ = jnn.LayerNorm().init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(y)) - 1) < 1e-3
  assert reference.max_error(y, reference.standardize(x, 1, epsilon=1e-6)) < 1e-4
  # flax's two-pass mode is right at 1e4 (it fails further out, from about 1e6)
  two_pass, _ = nn.LayerNorm(use_fast_variance=False).init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(two_pass)) - 1) < 1e-2


@flax_defect("LayerNorm's fast variance E[x^2] - E[x]^2 cancels at offset 1e4: output std "
             "about 800")
def test_flax_layer_norm_at_offset_1e4_has_output_std_1():
  x = far_data((8, 4096), 1e4)
  flax_y, _ = nn.LayerNorm().init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(flax_y)) - 1) < 1e-2


@pytest.mark.parametrize("offset", [1e6, 1e7])
def test_still_exact_at_offsets_where_two_pass_float32_fails(offset):
  x = far_data((64, 512), offset)
  y = jaxnorm.layer_norm(x, epsilon=0.0)
  assert reference.max_error(y, reference.standardize(x, 1)) < 1e-4


def test_bfloat16_mean_300_std_1_keeps_its_variance():
  """haiku: batch variance 0, output std 360. bfloat16 spacing at 300 is 2."""
  x = far_data((1024, 4), 300.0, dtype=jnp.bfloat16)
  mean, var = jaxnorm.moments(x, 0)
  exact = np.asarray(x, np.float64)
  np.testing.assert_allclose(var, exact.var(0), rtol=1e-5)
  assert np.all(np.asarray(var) > 0.5)
  np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6)
  y, _ = jnn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
  assert y.dtype == jnp.float32  # float32 parameters promote, as in flax
  assert abs(float(jnp.std(y)) - 1) < 1e-3
  y = jaxnorm.layer_norm(x.T)
  assert y.dtype == jnp.bfloat16
  assert abs(float(jnp.std(y.astype(jnp.float32))) - 1) < 1e-2


# --- masked statistics across devices ----------------------------------------------------------

def anchor_devices():
  """4 devices holding 8, 1, 1 and 1 valid rows: 0 on the first, 10 on the others."""
  x = np.zeros((4, 8, 1), np.float32)
  where = np.zeros((4, 8, 1), bool)
  where[0] = True
  for device in (1, 2, 3):
    x[device, 0], where[device, 0] = 10.0, True
  return x, where


def pmap4(fn):
  return jax.pmap(fn, axis_name="d", in_axes=(None, 0, 0), devices=jax.devices()[:4])


@pytest.fixture
def four_devices():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (conftest.py sets 8 host devices)")


def masked_step(module, variables, x, where):
  """Updated batch statistics of one training step of ``module`` on the 4 devices."""
  step = pmap4(lambda v, x, w: module.apply(v, x, mask=w, mutable=["batch_stats"]))
  return step(variables, x, where)


def test_masked_multi_device_mean_is_count_weighted_2_727(four_devices):
  x, where = anchor_devices()
  layer = jnn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="d")
  variables = layer.init(jax.random.key(0), x[0])
  _, ours = masked_step(layer, variables, x, where)
  np.testing.assert_allclose(ours["batch_stats"]["mean"], np.full((4, 1), 30 / 11), rtol=1e-6)


@flax_defect("masked BatchNorm across devices averages the per-device means (7.5), not weighted "
             "by valid count (2.727)")
def test_flax_masked_multi_device_mean_is_count_weighted_2_727(four_devices):
  x, where = anchor_devices()
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="d")
  variables = flax_layer.init(jax.random.key(0), x[0])
  _, theirs = masked_step(flax_layer, variables, x, where)
  np.testing.assert_allclose(theirs["batch_stats"]["mean"], np.full((4, 1), 30 / 11), rtol=1e-6)


def fully_masked_fourth_device():
  """anchor_devices with no valid row on the fourth device, and its valid values in float64."""
  x, where = anchor_devices()
  where[3] = False
  valid = np.concatenate([x[0, :8, 0], x[1:3, 0, 0]]).astype(np.float64)
  return x, where, valid


def test_fully_masked_device_does_not_poison_statistics_or_running_stats(four_devices):
  x, where, valid = fully_masked_fourth_device()
  layer = jnn.BatchNorm(use_running_average=False, momentum=0.5, axis_name="d")
  variables = layer.init(jax.random.key(0), x[0])
  y, ours = masked_step(layer, variables, x, where)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(ours["batch_stats"]["mean"], np.full((4, 1), 0.5 * valid.mean()),
                             rtol=1e-6)
  np.testing.assert_allclose(ours["batch_stats"]["var"],
                             np.full((4, 1), 0.5 + 0.5 * valid.var(ddof=1)), rtol=1e-5)


@flax_defect("one fully masked device makes every device's BatchNorm statistics NaN, for good")
def test_flax_fully_masked_device_does_not_poison_running_stats(four_devices):
  x, where, valid = fully_masked_fourth_device()
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.5, axis_name="d")
  variables = flax_layer.init(jax.random.key(0), x[0])
  _, theirs = masked_step(flax_layer, variables, x, where)
  np.testing.assert_allclose(theirs["batch_stats"]["mean"], np.full((4, 1), 0.5 * valid.mean()),
                             rtol=1e-6)


# --- GroupNorm masks ---------------------------------------------------------------------------

def broadcasting_mask_case():
  """Data, a mask of shape (2, 5, 1) that broadcasts over the 8 channels, and it broadcast."""
  x = far_data((2, 5, 8), 3.0)
  where = np.random.default_rng(1).random((2, 5, 1)) < 0.6
  where[:, 0] = True
  return x, where, np.broadcast_to(where, x.shape)


def test_group_norm_accepts_a_broadcasting_mask():
  x, where, full = broadcasting_mask_case()
  variables = jnn.GroupNorm(num_groups=2).init(jax.random.key(0), x)
  y = jnn.GroupNorm(num_groups=2).apply(variables, x, mask=where)
  np.testing.assert_allclose(y, jnn.GroupNorm(num_groups=2).apply(variables, x, mask=full),
                             atol=1e-6)
  assert reference.max_error(y, reference.group_norm(x, 2, full, 1e-6), full) < 1e-5
  # flax's LayerNorm accepts the same mask (its GroupNorm does not: the test below)
  nn.LayerNorm().apply(variables, x, mask=where)


@flax_defect("GroupNorm rejects a mask that broadcasts over the channels (LayerNorm accepts "
             "it): ValueError, cannot reshape", raises=ValueError)
def test_flax_group_norm_accepts_a_broadcasting_mask():
  x, where, full = broadcasting_mask_case()
  variables = nn.GroupNorm(num_groups=2).init(jax.random.key(0), x)
  y = nn.GroupNorm(num_groups=2).apply(variables, x, mask=where)
  assert reference.max_error(y, reference.group_norm(x, 2, full, 1e-6), full) < 1e-5


# --- running statistics ------------------------------------------------------------------------

def stored_var(module):
  """The running variance ``module`` stores after one batch of 2, averaged over 4000 batches."""
  batches = np.random.default_rng(2).standard_normal((4000, 2, 1)).astype(np.float32) * 2
  def one(x):
    variables = module.init(jax.random.key(0), x)
    _, state = module.apply(variables, x, mutable=["batch_stats"])
    return state["batch_stats"]["var"]
  return float(jnp.mean(jax.jit(jax.vmap(one))(batches)))


def test_running_variance_is_unbiased_batch_size_2_true_variance_4():
  """flax, haiku, equinox and Keras store 2.0 on average; PyTorch and jaxnorm 4.0."""
  ours = stored_var(jnn.BatchNorm(use_running_average=False, momentum=0.0))
  assert abs(ours - 4.0) < 0.4, ours   # standard error of the mean here is about 0.09


@flax_defect("BatchNorm's running variance averages the biased batch variance: 2.0 on average "
             "for batches of 2 of true variance 4")
def test_flax_running_variance_is_unbiased_batch_size_2_true_variance_4():
  theirs = stored_var(nn.BatchNorm(use_running_average=False, momentum=0.0))
  assert abs(theirs - 4.0) < 0.4, theirs


def nan_batch_case():
  """5 batches of 16 rows and 3 channels, a copy of the first with a NaN in channel 1, and
  ``train(module, sequence)``: the last output and the running statistics after the sequence."""
  rng = np.random.default_rng(3)
  batches = (rng.standard_normal((5, 16, 3)) * 2 + 7).astype(np.float32)
  bad = batches[0].copy()
  bad[4, 1] = np.nan  # a NaN in channel 1 only
  variables = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), batches[0])

  steps = {}  # one compiled training step a module, where eager dispatch compiles each primitive

  def train(module, sequence):
    if id(module) not in steps:
      steps[id(module)] = (module, jax.jit(functools.partial(module.apply,
                                                             mutable=["batch_stats"])))
    step = steps[id(module)][1]
    state = variables
    for x in sequence:
      y, updates = step(state, x)
      state = {**state, **updates}
    return y, state["batch_stats"]

  def evaluate(running):
    return jnn.BatchNorm(use_running_average=True).apply(
        {**variables, "batch_stats": running}, batches[0])

  return batches, bad, variables, train, evaluate


def test_one_nan_batch_does_not_corrupt_running_statistics():
  batches, bad, variables, train, evaluate = nan_batch_case()
  layer = jnn.BatchNorm(use_running_average=False, momentum=0.7)
  _, clean = train(layer, batches)
  _, stats = train(layer, [batches[0], batches[1], bad, batches[2], batches[3], batches[4]])

  # Evaluated with the final running statistics (training outputs use the batch's own): finite,
  # and channel 1, which skipped the bad batch, normalizes exactly as after the clean run.
  y_eval = evaluate(stats)
  assert np.all(np.isfinite(y_eval))
  np.testing.assert_allclose(y_eval[:, 1], evaluate(clean)[:, 1], rtol=1e-6)
  _, after_bad = train(layer, [batches[0], batches[1], bad])
  _, before_bad = train(layer, [batches[0], batches[1]])
  np.testing.assert_array_equal(after_bad["mean"][1], before_bad["mean"][1])  # skipped, per channel
  assert after_bad["mean"][0] != before_bad["mean"][0]  # the other channels still learn
  assert np.all(np.isfinite(stats["mean"])) and np.all(np.isfinite(stats["var"]))
  # Channel 1 skipped the bad batch: it ends exactly where the run without it ends.
  np.testing.assert_allclose(stats["mean"][1], clean["mean"][1], rtol=1e-6)
  np.testing.assert_allclose(stats["var"][1], clean["var"][1], rtol=1e-6)
  # The output of the bad batch still shows the NaN.
  y, _ = layer.apply(variables, bad, mutable=["batch_stats"])
  assert np.isnan(y[:, 1]).all() and np.all(np.isfinite(y[:, [0, 2]]))


@flax_defect("one NaN batch makes BatchNorm's running statistics NaN for good, and every "
             "evaluation after it")
def test_flax_one_nan_batch_does_not_corrupt_running_statistics():
  batches, bad, _, train, evaluate = nan_batch_case()
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.7)
  _, flax_stats = train(flax_layer, [batches[0], bad, batches[1]])
  assert np.all(np.isfinite(flax_stats["mean"])) and np.all(np.isfinite(flax_stats["var"]))
  assert np.all(np.isfinite(evaluate(flax_stats)))


def test_eval_before_any_training_is_finite():
  """equinox issues 955, 1010: evaluation before any training step must not blow up."""
  x = far_data((4, 3), 5.0)
  layer = jnn.BatchNorm(use_running_average=True)
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)  # mean 0, var 1 to start
  y, running = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(3), training=False)
  assert np.all(np.isfinite(y))
  # one example, evaluation mode, right after init with a batch of one: still finite
  single = jnn.BatchNorm()
  variables = single.init(jax.random.key(0), x[:1], use_running_average=False)
  assert np.all(np.isfinite(single.apply(variables, x[:1], use_running_average=True)))
