"""Bad input gives a clear error that names the fix, from the functions and from the layers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
import jaxnorm.linen as jnn

X = jnp.ones((4, 6, 8))


def init_apply(layer, x, **kwargs):
  """Initializes and applies a Linen layer (errors may come from either)."""
  variables = layer.init(jax.random.key(0), x, **kwargs)
  return layer.apply(variables, x, mutable=["batch_stats"], **kwargs)


def both_ways(fn):
  """The call as it is and under jit: the error must come at trace time too."""
  return [fn, jax.jit(fn)]


@pytest.mark.parametrize("call", [
    lambda: jaxnorm.group_norm(X, num_groups=3),
    lambda: jax.jit(functools.partial(jaxnorm.group_norm, num_groups=5))(X),
    lambda: init_apply(jnn.GroupNorm(num_groups=3), X),
    lambda: init_apply(jnn.GroupNorm(), X),  # flax's default of 32 groups for 8 channels
])
def test_groups_that_do_not_divide_the_channels(call):
  with pytest.raises(ValueError, match=r"must divide the 8 channels.*pick a divisor of 8 "
                                       r"\(1, 2, 4, 8\) or set group_size"):
    call()


def test_group_size_that_does_not_divide_and_both_or_neither_given():
  with pytest.raises(ValueError, match="group_size=3 must divide the 8 channels.*pick a divisor"):
    jaxnorm.group_norm(X, num_groups=None, group_size=3)
  with pytest.raises(ValueError, match="exactly one of num_groups=2 and group_size=4"):
    jaxnorm.group_norm(X, num_groups=2, group_size=4)
  with pytest.raises(ValueError, match="exactly one.*pass num_groups=None"):
    init_apply(jnn.GroupNorm(group_size=4), X)  # num_groups keeps flax's default of 32


@pytest.mark.parametrize("call", [
    lambda: jaxnorm.moments(X, 3),
    lambda: jaxnorm.moments(X, (0, -4)),
    lambda: jax.jit(lambda x: jaxnorm.moments(x, 5))(X),
    lambda: jaxnorm.layer_norm(X, reduction_axes=3),
    lambda: jaxnorm.rms_norm(X, reduction_axes=(1, 7)),
    lambda: jaxnorm.batch_norm(X, None, training=True, axis=3),
    lambda: jaxnorm.group_norm(X, num_groups=2, reduction_axes=(1, 4)),
    lambda: jaxnorm.normalize(X, jnp.zeros(8), jnp.ones(8), feature_axes=3),
    lambda: init_apply(jnn.LayerNorm(feature_axes=3), X),
    lambda: init_apply(jnn.BatchNorm(use_running_average=False, axis=-4), X),
    lambda: init_apply(jnn.InstanceNorm(feature_axes=(3,)), X),
])
def test_axes_out_of_range(call):
  with pytest.raises(ValueError, match=r"out of range for x.shape=\(4, 6, 8\); "
                                       r"use axes in \[-3, 2\]"):
    call()


def test_repeated_axis_and_non_integer_axis():
  with pytest.raises(ValueError, match="names an axis twice.*list each axis once"):
    jaxnorm.moments(X, (1, -2))
  with pytest.raises(TypeError, match=r"axes=1.0 must be an int or a sequence of ints, "
                                      r"e.g. axes=-1 or axes=\(1, 2\)"):
    jaxnorm.moments(X, 1.0)
  with pytest.raises(TypeError, match="must be ints; got 1.5"):
    jaxnorm.moments(X, (0, 1.5))


@pytest.mark.parametrize("mask_shape", [(6,), (4, 6, 2), (5, 1, 1), (2, 4, 6, 8)])
@pytest.mark.parametrize("name", ["moments", "layer_norm", "group_norm", "batch_norm",
                                  "LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm"])
def test_mask_that_does_not_broadcast(name, mask_shape):
  where = jnp.ones(mask_shape, bool)
  call = {
      "moments": lambda: jaxnorm.moments(X, 0, where=where),
      "layer_norm": lambda: jaxnorm.layer_norm(X, where=where),
      "group_norm": lambda: jaxnorm.group_norm(X, num_groups=2, where=where),
      "batch_norm": lambda: jaxnorm.batch_norm(X, None, training=True, where=where),
      "LayerNorm": lambda: init_apply(jnn.LayerNorm(), X, mask=where),
      "BatchNorm": lambda: init_apply(jnn.BatchNorm(use_running_average=False), X, mask=where),
      "GroupNorm": lambda: init_apply(jnn.GroupNorm(num_groups=2), X, mask=where),
      "RMSNorm": lambda: init_apply(jnn.RMSNorm(), X, mask=where),
  }[name]
  with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast to "
                                       r"x.shape=\(4, 6, 8\); give a mask with x's shape, or "
                                       r"with size 1 on the axes where it does not vary"):
    call()


@pytest.mark.parametrize("call,name", [
    (lambda: jaxnorm.layer_norm(X, jnp.ones(6)), "scale"),
    (lambda: jaxnorm.layer_norm(X, None, jnp.ones((8, 1))), "bias"),
    (lambda: jaxnorm.rms_norm(X, jnp.ones(7)), "scale"),
    (lambda: jaxnorm.group_norm(X, jnp.ones(4), num_groups=2), "scale"),
    (lambda: jaxnorm.instance_norm(X, None, jnp.ones(2)), "bias"),
    (lambda: jaxnorm.batch_norm(X, None, jnp.ones(6), training=True), "scale"),
    (lambda: jaxnorm.normalize(X, jnp.zeros(6), jnp.ones(8)), "mean"),
])
def test_scale_bias_and_statistics_of_the_wrong_shape(call, name):
  with pytest.raises(ValueError, match=rf"{name} of shape .* does not fit x.shape=\(4, 6, 8\) "
                                       rf"with feature axes .*; give it the feature shape"):
    call()


def test_batch_of_one_in_training():
  fix = r"at least 2 values per channel.*use a larger batch, use_running_average=True"
  with pytest.raises(ValueError, match=fix):
    jaxnorm.batch_norm(jnp.ones((1, 8)), None, training=True)
  with pytest.raises(ValueError, match=fix):
    jax.jit(lambda x: jaxnorm.batch_norm(x, None, training=True))(jnp.ones((1, 8)))
  layer = jnn.BatchNorm(use_running_average=False)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))  # init with one example is fine
  with pytest.raises(ValueError, match=fix):
    layer.apply(variables, jnp.ones((1, 8)), mutable=["batch_stats"])
  # with every axis a feature axis there is one value per channel too
  with pytest.raises(ValueError, match=fix):
    jaxnorm.batch_norm(jnp.ones((4, 8)), None, training=True, axis=(0, 1))


@pytest.mark.parametrize("layer", [jnn.BatchNorm(use_running_average=False), jnn.LayerNorm(),
                                   jnn.RMSNorm(), jnn.GroupNorm(num_groups=2),
                                   jnn.InstanceNorm()])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_input_to_a_layer(layer, dtype):
  x = jnp.ones((4, 6, 8), dtype)
  with pytest.raises(TypeError, match=r"expects floating-point input( \(or complex\))?, got dtype .*; cast it "
                                      r"first, e.g. x.astype\(jnp.float32\)"):
    layer.init(jax.random.key(0), x)


@pytest.mark.parametrize("fn", [jaxnorm.layer_norm, jaxnorm.rms_norm, jaxnorm.instance_norm,
                                functools.partial(jaxnorm.group_norm, num_groups=2)])
def test_integer_input_to_a_normalization_function(fn):
  with pytest.raises(TypeError, match="cast it first"):
    fn(np.ones((4, 6, 8), np.int32))
  # moments itself accepts integers (dataset statistics of uint8 images) in float32
  assert jaxnorm.moments(np.ones((4, 3), np.uint8), 0)[0].dtype == jnp.float32


def test_other_errors_name_the_fix():
  with pytest.raises(ValueError, match="needs the running statistics; pass running="):
    jaxnorm.batch_norm(X, None, training=False)
  with pytest.raises(ValueError, match="no axis to reduce; give x spatial axes"):
    jaxnorm.instance_norm(jnp.ones((4, 8)))
  with pytest.raises(ValueError, match="includes axis 0, the batch axis.*move the batch first"):
    jaxnorm.instance_norm(X, feature_axes=(0, 2))
  with pytest.raises(ValueError, match="must include the last axis.*channels-last"):
    jaxnorm.group_norm(X, num_groups=2, reduction_axes=(1,))


def test_valid_calls_are_not_rejected():
  """The checks accept what they should: broadcasting masks, negative axes, flax shapes."""
  where = np.ones((4, 1, 8), bool)
  for fn in both_ways(lambda x: jaxnorm.layer_norm(x, jnp.ones(8), jnp.zeros(8), where=where,
                                                   reduction_axes=(-2, -1))):
    assert np.all(np.isfinite(fn(X)))
  assert jaxnorm.layer_norm(X, jnp.ones((1, 1, 8))).shape == X.shape  # broadcastable params
  y, _ = init_apply(jnn.GroupNorm(num_groups=None, group_size=2), X, mask=where)
  assert np.all(np.isfinite(y))


X2 = jnp.ones((3, 4))


@pytest.mark.parametrize("call", [
    lambda: jaxnorm.batch_norm(X2, jaxnorm.init_batch_stats(3), jnp.arange(4.0), training=True,
                               axis=0),
    lambda: jaxnorm.batch_norm(X2, jaxnorm.init_batch_stats(3), None, jnp.arange(4.0),
                               training=False, axis=0),
    lambda: jaxnorm.layer_norm(X2, jnp.ones((4, 1)), feature_axes=0, reduction_axes=0),
    lambda: jaxnorm.normalize(X2, jnp.zeros(4), jnp.ones(3), feature_axes=0),
])
def test_a_param_of_another_axis_size_is_refused(call):
  """(4,) broadcasts against (3, 4), but along axis 1, not along the feature axis 0."""
  with pytest.raises(ValueError, match=r"does not fit x.shape=\(3, 4\) with feature axes "
                                       r"\(0,\); give it the feature shape \(3,\) \(or \(3, 1\)\)"):
    call()


def test_feature_params_that_fit_are_accepted():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
  expected = jaxnorm.batch_norm(x, None, jnp.arange(1.0, 4.0), training=True, axis=0)[0]
  np.testing.assert_array_equal(  # x's number of axes, size 1 off the feature axis
      jaxnorm.batch_norm(x, None, jnp.arange(1.0, 4.0).reshape(3, 1), training=True, axis=0)[0],
      expected)
  y = jaxnorm.batch_norm(x, None, jnp.float32(2.0), jnp.ones((1, 1)), training=True, axis=0)[0]
  np.testing.assert_allclose(y, 2 * jaxnorm.batch_norm(x, None, training=True, axis=0)[0] + 1,
                             rtol=1e-6)


def renorm_call(running, training):
  return jaxnorm.batch_renorm(X2, jaxnorm.RenormStats(running.mean, running.var,
                                                      jnp.array(0, jnp.int32)),
                              training=training, axis=0)


RUNNING_SHAPE_CALLS = {
    "ghost_batch_norm": lambda running, training: jaxnorm.ghost_batch_norm(
        X2.T, running, training=training, virtual_batch_size=2),
    "lp_batch_norm": lambda running, training: jaxnorm.lp_batch_norm(
        X2, running, training=training, p=1, axis=0),
    "batch_renorm": renorm_call,
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("running", [jaxnorm.init_batch_stats(1),
                                     jaxnorm.BatchStats(jnp.zeros(4), jnp.ones(4))],
                         ids=["(1,)", "(4,)"])
@pytest.mark.parametrize("name", sorted(RUNNING_SHAPE_CALLS))
def test_running_statistics_of_the_wrong_shape(name, running, training):
  """Running statistics must have the feature shape (3,): (1,) and (4,) broadcast silently."""
  init = "init_renorm_stats" if name == "batch_renorm" else "init_batch_stats"
  for fn in both_ways(lambda running: RUNNING_SHAPE_CALLS[name](running, training)):
    with pytest.raises(ValueError, match=rf"{name}: running.mean of shape \(\d,\) does not "
                                         rf"match the feature shape \(3,\) of x; use "
                                         rf"jaxnorm.{init}\(3\)"):
      fn(running)


def test_batch_norm_running_statistics_of_the_wrong_shape_in_training():
  with pytest.raises(ValueError, match=r"use jaxnorm.init_batch_stats\(3\)"):
    jaxnorm.batch_norm(X2, jaxnorm.init_batch_stats(1), training=True, axis=0)


def test_batch_norm_running_statistics_of_the_wrong_shape_in_evaluation():
  with pytest.raises(ValueError, match=r"running.mean of shape \(6,\) does not match the "
                                       r"feature shape \(8,\) of x; use "
                                       r"jaxnorm.init_batch_stats\(8\)"):
    jaxnorm.batch_norm(X, jaxnorm.init_batch_stats(6), training=False)
