"""FiLM, AdaLN-Zero, conditional batch norm and AdaIN.

Every function against a float64 NumPy reference (at offsets up to 1e6 where it centres), with
and without jit, under vmap, check_grads in float64, bfloat16 input with float32 statistics,
errors that name the fix, and the Linen and NNX layers on the same functions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from tests import reference
from tests.test_transformer_norms import data, jit_and_eager, per_example


# --- FiLM and AdaLN-Zero --------------------------------------------------------------------


def test_film_matches_float64_and_vmap():
  x, gamma, beta = data((3, 5, 4)), data((3, 4), seed=1), data((3, 4), seed=2)
  ref = x.astype(np.float64) * (1 + per_example(gamma, 3)) + per_example(beta, 3)
  for film, _ in jit_and_eager(jaxnorm.film, scale_offset=1.0):
    assert reference.max_error(film(x, gamma, beta), ref) < 1e-5
  mapped = jax.vmap(lambda x, g, b: jaxnorm.film(x[None], g[None], b[None])[0])(x, gamma, beta)
  np.testing.assert_allclose(mapped, jaxnorm.film(x, gamma, beta), rtol=1e-6)
  with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
    jaxnorm.film(x, gamma[:, :3], beta)


def silu(a):
  return a / (1 + np.exp(-a))


def test_ada_ln_zero_matches_float64():
  condition, kernel, bias = data((2, 5), seed=1), data((5, 24), seed=2) * 0.3, data((24,), seed=3)
  projected = silu(condition.astype(np.float64)) @ kernel + bias
  shift, scale, gate_ref = np.split(projected, 3, axis=-1)
  for ada_ln_zero, offsets in jit_and_eager(jaxnorm.ada_ln_zero, epsilon=0.0):
    for offset in offsets:
      x = data((2, 6, 8), offset)
      y, gate = ada_ln_zero(x, condition, kernel, bias)
      ref = reference.standardize(x, (2,)) * (1 + per_example(scale, 3)) + per_example(shift, 3)
      assert reference.max_error(y, ref) < 1e-4
      assert reference.max_error(gate, per_example(gate_ref, 3)) < 1e-5


def test_ada_ln_zero_block_starts_as_identity_and_learns():
  """DiT: with the zero projection, x + gate * branch(y) is x; the gate's gradient is not 0."""
  x, condition = data((2, 6, 8), 3.0), data((2, 5), seed=1)
  layer = jnn.AdaLNZero()
  params = layer.init(jax.random.key(0), x, condition)["params"]

  def block(params, x):
    y, gate = layer.apply({"params": params}, x, condition)
    return x + gate * jnp.tanh(y * 2.0)

  np.testing.assert_array_equal(block(params, x), x)
  grads = jax.grad(lambda p: jnp.sum(block(p, x) ** 2))(params)
  assert float(jnp.abs(grads["kernel"]).max()) > 0 and float(jnp.abs(grads["bias"]).max()) > 0


def test_ada_norms_gradients_and_rms_kind():
  with jax.enable_x64(True):
    x, condition = data((2, 3, 4), 30.0, dtype=np.float64), data((2, 3), seed=1, dtype=np.float64)
    kernel = data((3, 12), seed=2, dtype=np.float64)

    def both_kinds(x, condition, kernel):
      return [jaxnorm.ada_ln_zero(x, condition, kernel, kind=kind, epsilon=1e-3)
              for kind in ("layer", "rms")]

    check_grads(jax.jit(both_kinds), (x, condition, kernel), order=1, modes=["fwd", "rev"],
                atol=1e-6, rtol=1e-6)
    y = jaxnorm.ada_layer_norm(x, np.zeros((2, 4)), np.zeros((2, 4)), kind="rms", epsilon=0.0)
    np.testing.assert_allclose(y, reference.rms_norm(x, (2,)), rtol=1e-10)


def test_conditioning_of_the_wrong_width_names_the_fix():
  x = jnp.ones((2, 3, 8))
  with pytest.raises(ValueError, match="pass conditioning vectors of width 5"):
    jaxnorm.ada_ln_zero(x, jnp.ones((2, 7)), jnp.zeros((5, 24)))
  with pytest.raises(ValueError, match=r"needs 3 \* 8 = 24"):
    jaxnorm.ada_ln_zero(x, jnp.ones((2, 5)), jnp.zeros((5, 12)))
  for layer in (jnn.AdaLNZero(), jnn.FiLM()):
    variables = layer.init(jax.random.key(0), x, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="conditioning vectors of width 5"):
      layer.apply(variables, x, jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="conditioning vectors of width 5"):
    jnnx.AdaLNZero(8, 5)(x, jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="conditioning vectors of width 5"):
    jnnx.FiLM(8, 5, rngs=nnx.Rngs(0))(x, jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
    jnnx.FiLM(8, 5)  # a random kernel needs keys


def test_linen_and_nnx_conditioning_layers_agree():
  x, condition = data((2, 3, 8), 2.0), data((2, 5), seed=1)
  for linen, layer in ((jnn.FiLM(), jnnx.FiLM(8, 5, rngs=nnx.Rngs(0))),
                       (jnn.AdaLNZero(), jnnx.AdaLNZero(8, 5))):
    params = linen.init(jax.random.key(0), x, condition)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * data(a.shape, seed=4), params)
    nnx.update(layer, nnx.State(params))
    want = linen.apply({"params": params}, x, condition)
    for got, expected in zip(jax.tree.leaves(layer(x, condition)), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- Conditional batch norm -----------------------------------------------------------------


def test_conditional_batch_norm_matches_float64():
  labels, scale, bias = np.array([0, 2, 1, 2, 0, 0]), data((3, 4), seed=1), data((3, 4), seed=2)
  for train, offsets in jit_and_eager(jaxnorm.conditional_batch_norm, training=True,
                                      epsilon=0.0):
    for offset in offsets:
      x = data((6, 5, 4), offset)
      y, running = train(x, labels, jaxnorm.init_batch_stats(4), scale, bias)
      ref = (reference.standardize(x, (0, 1)) * per_example(scale[labels], 3)
             + per_example(bias[labels], 3))
      assert reference.max_error(y, ref) < 1e-4
  _, plain = jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(4), training=True, epsilon=0.0)
  np.testing.assert_allclose(running.mean, plain.mean, rtol=1e-6)
  np.testing.assert_allclose(running.var, plain.var, rtol=1e-6)
  y_eval, same = jaxnorm.conditional_batch_norm(x, labels, running, scale, bias, training=False)
  ref_eval = ((x.astype(np.float64) - np.asarray(running.mean)) / np.sqrt(np.asarray(running.var)
              + 1e-5) * per_example(scale[labels], 3) + per_example(bias[labels], 3))
  assert same is running and reference.relative_error(y_eval, ref_eval) < 1e-5


def test_conditional_batch_norm_syncs_over_devices_and_takes_grads():
  x, labels, scale = data((4, 6, 3), 100.0), np.array([1, 0, 1, 1]), data((2, 3), seed=1)
  synced = jax.jit(jax.vmap(lambda x, l: jaxnorm.conditional_batch_norm(
      x, l, None, scale, training=True, axis_name="batch")[0], axis_name="batch"))
  pooled, _ = jax.jit(functools.partial(jaxnorm.conditional_batch_norm, training=True))(
      x.reshape(8, 3, 3), np.repeat(labels, 2), None, scale)
  np.testing.assert_allclose(synced(x.reshape(4, 2, 3, 3), labels.reshape(4, 1).repeat(2, 1)),
                             pooled.reshape(4, 2, 3, 3), rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    fn = lambda x, s, b: jaxnorm.conditional_batch_norm(  # noqa: E731
        x, labels, None, s, b, training=True, epsilon=1e-3)[0]
    check_grads(jax.jit(fn), (x.astype(np.float64), scale.astype(np.float64),
                              scale.astype(np.float64)), order=1, modes=["fwd", "rev"],
                atol=1e-5, rtol=1e-5)


def test_conditional_batch_norm_labels_out_of_range():
  x, scale = data((3, 4)), np.ones((2, 4), np.float32)
  with pytest.raises(ValueError, match=r"labels hold \[2\].*num_classes=3"):
    jaxnorm.conditional_batch_norm(x, np.array([0, 2, 1]), None, scale, training=True)
  with pytest.raises(TypeError, match="argmax"):
    jaxnorm.conditional_batch_norm(x, np.eye(3, 2), None, scale, training=True)
  layer = jnn.ConditionalBatchNorm(num_classes=2, use_running_average=False)
  variables = layer.init(jax.random.key(0), x, np.array([0, 1, 1]))
  with pytest.raises(ValueError, match="out of range for the 2 classes"):
    layer.apply(variables, x, np.array([0, 5, 1]), mutable=["batch_stats"])
  y = jax.jit(lambda l: jaxnorm.conditional_batch_norm(x, l, None, scale, training=True)[0])(
      np.array([0, 2, 1]))  # traced labels cannot raise: the example's output is NaN
  y = np.asarray(y)
  assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_conditional_batch_norm_layers_train_and_agree():
  x, labels = data((8, 3), 10.0), np.array([0, 1, 2, 0, 1, 2, 0, 1])
  linen = jnn.ConditionalBatchNorm(num_classes=3, use_running_average=False, momentum=0.5)
  variables = linen.init(jax.random.key(0), x, labels)
  variables = {"params": jax.tree.map(lambda a: a + data(a.shape, seed=5), variables["params"]),
               "batch_stats": variables["batch_stats"]}
  layer = jnnx.ConditionalBatchNorm(3, 3, momentum=0.5)
  nnx.update(layer, nnx.State(variables["params"]))
  for step in range(2):
    y, updates = linen.apply(variables, x + step, labels, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}
    np.testing.assert_allclose(layer(x + step, labels), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.mean[...], variables["batch_stats"]["mean"], rtol=1e-6)
  layer.eval()
  y_eval = linen.clone(use_running_average=True).apply(variables, x, labels)
  np.testing.assert_allclose(layer(x, labels), y_eval, rtol=1e-5, atol=1e-5)


# --- AdaIN ----------------------------------------------------------------------------------


def adain_reference(content, style, epsilon=1e-5):
  content, style = np.asarray(content, np.float64), np.asarray(style, np.float64)
  axes = tuple(range(1, content.ndim - 1))
  style_mean, style_var, _ = reference.moments(style, axes)
  return (reference.standardize(content, axes, epsilon=epsilon) * np.sqrt(style_var + epsilon)
          + style_mean)


def test_adain_matches_float64():
  for adain, offsets in jit_and_eager(jaxnorm.adain):
    for offset in offsets:
      content = data((2, 6, 5, 3), offset)
      style = data((2, 4, 7, 3), -offset, seed=1) * 3  # another spatial size
      assert reference.relative_error(adain(content, style),
                                      adain_reference(content, style)) < 1e-5
      one_style = adain(content, style[:1])  # one style for every example
      ref = adain_reference(content, np.repeat(style[:1], 2, 0))
      assert reference.relative_error(one_style, ref) < 1e-5


def test_adain_masks_grads_vmap_and_bfloat16():
  content, style = data((2, 6, 3), 50.0), data((2, 5, 3), seed=1)
  where = np.ones((2, 6, 1), bool)
  where[:, 4:] = False

  @jax.jit
  def outputs(content, style):
    return (jaxnorm.adain(content, style, where=where), jaxnorm.adain(content, style),
            jax.vmap(lambda c, s: jaxnorm.adain(c[None], s[None])[0])(content, style),
            jaxnorm.adain(content.astype(jnp.bfloat16), style.astype(jnp.bfloat16)))

  masked, whole, mapped, y16 = outputs(content, style)
  np.testing.assert_allclose(masked[:, :4], adain_reference(content[:, :4], style), rtol=1e-5)
  np.testing.assert_allclose(mapped, whole, rtol=1e-6, atol=1e-6)
  assert y16.dtype == jnp.bfloat16
  ref16 = adain_reference(content.astype(jnp.bfloat16).astype(np.float32),
                          style.astype(jnp.bfloat16).astype(np.float32))
  assert reference.relative_error(y16, ref16) < 1e-2
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda c, s: jaxnorm.adain(c, s, epsilon=1e-3)),
                (content.astype(np.float64), style.astype(np.float64)), order=1,
                modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="3 channels"):
    jaxnorm.adain(content, style[..., :2])
  with pytest.raises(ValueError, match="spatial axes"):
    jaxnorm.adain(content[:, 0], style[:, 0])


@pytest.mark.parametrize("name", ["film", "ada_ln_zero", "conditional_batch_norm"])
def test_bfloat16_inputs_float32_statistics(name):
  x = data((4, 6, 8), 300.0)
  x16 = x.astype(jnp.bfloat16)
  exact = x16.astype(np.float64)
  if name == "film":
    y = jaxnorm.film(x16, jnp.ones((4, 8), jnp.bfloat16), jnp.zeros((4, 8), jnp.bfloat16))
    ref = exact
  elif name == "ada_ln_zero":
    y, _ = jaxnorm.ada_ln_zero(x16, jnp.ones((4, 3), jnp.bfloat16),
                               jnp.zeros((3, 24), jnp.bfloat16), epsilon=0.0)
    ref = reference.standardize(exact, (2,))
  else:
    y, _ = jaxnorm.conditional_batch_norm(x16, np.arange(4) % 2, None,
                                          jnp.ones((2, 8), jnp.bfloat16), training=True,
                                          epsilon=0.0)
    ref = reference.standardize(exact, (0, 1))
  assert y.dtype == jnp.bfloat16
  assert reference.relative_error(y, ref) < 1e-2
