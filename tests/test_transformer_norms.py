"""Scale offset, QK-norm and fused add + norm (the conditional norms: test_conditional_norms.py).

Every function against a float64 NumPy reference (at offsets up to 1e6 where it centres), with
and without jit, under vmap, check_grads in float64, bfloat16 input with float32 statistics,
errors that name the fix, and the Linen and NNX layers on the same functions.
"""
import functools

import flax.linen as nn
import flax.serialization
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

OFFSETS = [0.0, 1e2, 1e4, 1e6]


def data(shape, offset=0.0, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + offset).astype(dtype)


def jit_and_eager(fn, offsets=tuple(OFFSETS), **kwargs):
  """``[(fn under one jax.jit, offsets), (fn called directly, one far offset)]``.

  Eager calls run op by op (slow on 2 cores), so they take one offset, the jitted all.
  """
  bound = functools.partial(fn, **kwargs)
  return [(jax.jit(bound), offsets), (bound, offsets[-2:-1])]


def per_example(param, ndim):
  """(batch, channels) as (batch, 1, ..., channels)."""
  param = np.asarray(param, np.float64)
  return param.reshape((param.shape[0],) + (1,) * (ndim - 2) + (param.shape[1],))


# --- Scale offset --------------------------------------------------------------------------


def test_scale_offset_is_one_plus_gamma():
  gamma, beta = data((32,), seed=1) * 0.1, data((32,), seed=2)
  for (layer_norm, offsets), (rms_norm, _) in zip(
      jit_and_eager(jaxnorm.layer_norm, epsilon=0.0, scale_offset=1.0),
      jit_and_eager(jaxnorm.rms_norm, epsilon=0.0, scale_offset=1.0)):
    for offset in offsets:
      x = data((8, 32), offset)
      ref = reference.standardize(x, (1,)) * (1 + gamma.astype(np.float64)) + beta
      assert reference.max_error(layer_norm(x, gamma, beta), ref) < 1e-4
      ref = reference.rms_norm(x, (1,)) * (1 + gamma.astype(np.float64))
      assert reference.relative_error(rms_norm(x, gamma), ref) < 1e-5


def test_bfloat16_zero_centred_scale_keeps_its_precision():
  """1 + 2**-9 rounds to 1 in bfloat16; the offset is added in float32."""
  x = data((4, 16))
  gamma = jnp.full((16,), 2.0**-9, jnp.bfloat16)
  y = jaxnorm.rms_norm(x, gamma, epsilon=0.0, scale_offset=1.0)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, reference.rms_norm(x, (1,)) * (1 + 2.0**-9), rtol=1e-6)
  y16 = jaxnorm.layer_norm(x.astype(jnp.bfloat16), gamma, epsilon=0.0, scale_offset=1.0)
  assert y16.dtype == jnp.bfloat16  # the stored dtypes decide, not the widened sum


def test_scale_offset_without_scale_names_the_fix():
  with pytest.raises(ValueError, match="scale_offset=0.0"):
    jaxnorm.layer_norm(data((2, 4)), scale_offset=1.0)


def test_scale_offset_gradients():
  with jax.enable_x64(True):
    x, gamma = data((3, 6), 50.0, dtype=np.float64), data((6,), seed=1, dtype=np.float64)
    fn = lambda x, g: jaxnorm.layer_norm(x, g, epsilon=1e-3, scale_offset=1.0)  # noqa: E731
    check_grads(jax.jit(fn), (x, gamma), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def gemma_rms_norm(x, scale, epsilon=1e-6):
  """Gemma's RMSNorm, float64: ``x * rsqrt(mean(x**2) + eps) * (1 + scale)``."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + epsilon) * (1 + np.float64(scale))


def test_gemma_style_checkpoint_loads_into_linen_and_nnx(tmp_path):
  """A checkpoint with zero-centred scales (as Gemma and Transformer Engine store them)."""
  gamma, beta, x = data((16,), seed=3) * 0.2, data((16,), seed=4), data((4, 16), 3.0)
  path = tmp_path / "norms.msgpack"
  path.write_bytes(flax.serialization.to_bytes(
      {"rms": {"params": {"scale": gamma}}, "ln": {"params": {"scale": gamma, "bias": beta}}}))
  rms = jnn.RMSNorm(scale_offset=1.0, scale_init=nn.initializers.zeros)
  ln = jnn.LayerNorm(scale_offset=1.0, scale_init=nn.initializers.zeros)
  template = {"rms": rms.init(jax.random.key(0), x), "ln": ln.init(jax.random.key(0), x)}
  restored = flax.serialization.from_bytes(template, path.read_bytes())
  ln_ref = reference.standardize(x, (1,), epsilon=1e-6) * (1 + gamma.astype(np.float64)) + beta
  assert reference.max_error(rms.apply(restored["rms"], x), gemma_rms_norm(x, gamma)) < 1e-5
  assert reference.max_error(ln.apply(restored["ln"], x), ln_ref) < 1e-5
  # A fresh layer is the plain norm; the same checkpoint loads into the NNX layers.
  np.testing.assert_allclose(rms.apply(template["rms"], x), jaxnorm.rms_norm(x), rtol=1e-6)
  layer = jnnx.RMSNorm(16, scale_offset=1.0, scale_init=nnx.initializers.zeros_init())
  nnx.update(layer, nnx.State(restored["rms"]["params"]))
  assert reference.max_error(layer(x), gemma_rms_norm(x, gamma)) < 1e-5
  layer = jnnx.LayerNorm(16, scale_offset=1.0, scale_init=nnx.initializers.zeros_init())
  nnx.update(layer, nnx.State(restored["ln"]["params"]))
  assert reference.max_error(layer(x), ln_ref) < 1e-5


# --- QK-norm --------------------------------------------------------------------------------


def head_norm_reference(x, scale, kind, epsilon=1e-6):
  x = np.asarray(x, np.float64)
  y = (reference.standardize(x, (x.ndim - 1,), epsilon=epsilon) if kind == "layer"
       else reference.rms_norm(x, (x.ndim - 1,), epsilon=epsilon))
  return y if scale is None else y * np.asarray(scale, np.float64)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("per_head", [False, True])
def test_qk_norm_matches_float64(kind, per_head):
  q_scale = data((4, 8) if per_head else (8,), seed=2)
  k_scale = data((2, 8) if per_head else (8,), seed=3)
  offsets = tuple(OFFSETS) if kind == "layer" else (0.0, 1e3, 1.0)  # RMS norm does not centre
  for qk_norm, offsets in jit_and_eager(jaxnorm.qk_norm, offsets, kind=kind):
    for offset in offsets:
      q, k = data((2, 5, 4, 8), offset), data((2, 7, 2, 8), offset, seed=1)  # grouped-query
      q_out, k_out = qk_norm(q, k, q_scale, k_scale)
      assert reference.max_error(q_out, head_norm_reference(q, q_scale, kind)) < 1e-4
      assert reference.max_error(k_out, head_norm_reference(k, k_scale, kind)) < 1e-4


def test_qk_norm_bfloat16_input_float32_statistics():
  q, k = data((2, 3, 2, 16), 300.0), data((2, 3, 2, 16), -300.0, seed=1)
  q16, k16 = (a.astype(jnp.bfloat16) for a in (q, k))
  q_out, k_out = jaxnorm.qk_norm(q16, k16)
  assert q_out.dtype == k_out.dtype == jnp.bfloat16
  ref = head_norm_reference(q16.astype(np.float32), None, "layer")
  assert reference.max_error(q_out, ref) < 5e-2


def test_qk_norm_errors_name_the_fix():
  with pytest.raises(ValueError, match="differ in head_dim.*project both"):
    jaxnorm.qk_norm(jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 4, 16)))
  with pytest.raises(ValueError, match=r"give \(8,\) .* or \(4, 8\)"):
    jaxnorm.head_norm(jnp.ones((1, 2, 4, 8)), jnp.ones((2, 3, 8)))
  with pytest.raises(ValueError, match="kind='rms'"):
    jaxnorm.qk_norm(jnp.ones((1, 4, 8)), jnp.ones((1, 4, 8)), kind="l2")
  with pytest.raises(ValueError, match="build the layer with head_dim=16"):
    jnnx.HeadNorm(8)(jnp.ones((1, 2, 4, 16)))
  with pytest.raises(ValueError, match="num_heads=None"):
    jnnx.HeadNorm(8, 4)(jnp.ones((1, 2, 3, 8)))
  layer = jnn.QKNorm()
  variables = layer.init(jax.random.key(0), jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 4, 8)))
  with pytest.raises(ValueError, match="initialize the layer anew for head_dim 16"):
    layer.apply(variables, jnp.ones((1, 2, 4, 16)), jnp.ones((1, 2, 4, 16)))


def test_qk_norm_gradients_and_vmap():
  with jax.enable_x64(True):
    q, k = data((2, 3, 2, 4), 10.0, dtype=np.float64), data((2, 3, 2, 4), seed=1, dtype=np.float64)
    scale = data((2, 4), seed=2, dtype=np.float64)

    def both_kinds(q, k, scale):
      return [jaxnorm.qk_norm(q, k, scale, scale, kind=kind, epsilon=1e-3)
              for kind in ("layer", "rms")]

    check_grads(jax.jit(both_kinds), (q, k, scale), order=1, modes=["fwd", "rev"], atol=1e-6,
                rtol=1e-6)
    mapped, whole = jax.jit(lambda q, k: (
        jax.vmap(lambda q, k: jaxnorm.qk_norm(q, k, scale, scale))(q, k),
        jaxnorm.qk_norm(q, k, scale, scale)))(q, k)
    for got, want in zip(mapped, whole):
      np.testing.assert_allclose(got, want, rtol=1e-12)


def test_qk_norm_attention_in_flax_attention_equals_normalize_qk():
  """flax's normalize_qk (LayerNorm, shared scale) is QKNormAttention() with moved parameters."""
  x = data((2, 5, 16), seed=4)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, normalize_qk=True)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=jnn.QKNormAttention())
  variables = theirs.init(jax.random.key(0), x)
  params = dict(variables["params"])
  params["query_ln"] = {"scale": data((4,), seed=5)}
  params["key_ln"] = {"scale": data((4,), seed=6)}
  moved = {k: v for k, v in params.items() if not k.endswith("_ln")}
  moved["attention_fn"] = {"query_norm": params["query_ln"], "key_norm": params["key_ln"]}
  assert jax.tree.structure(ours.init(jax.random.key(0), x)["params"]) == jax.tree.structure(moved)
  np.testing.assert_allclose(ours.apply({"params": moved}, x),
                             theirs.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_nnx_head_norm_replaces_flax_attention_norms():
  x = data((2, 5, 16), seed=7)
  attention = nnx.MultiHeadAttention(4, 16, 16, normalize_qk=True, decode=False,
                                     rngs=nnx.Rngs(0))
  theirs = attention(x)
  attention.query_ln, attention.key_ln = jnnx.HeadNorm(4), jnnx.HeadNorm(4)
  np.testing.assert_allclose(attention(x), theirs, rtol=1e-5, atol=1e-5)
  attention.query_ln = jnnx.HeadNorm(4, 4, kind="rms")  # per head: (heads, head_dim)
  attention.key_ln = jnnx.HeadNorm(4, 4, kind="rms")
  assert attention(x).shape == x.shape and attention.query_ln.scale.shape == (4, 4)


def test_linen_and_nnx_qk_norm_agree():
  q, k = data((2, 3, 4, 8), 5.0), data((2, 3, 2, 8), seed=1)
  linen = jnn.QKNorm(per_head=True, kind="rms")
  variables = linen.init(jax.random.key(0), q, k)
  variables = jax.tree.map(lambda a: a + data(a.shape, seed=9), variables)
  layer = jnnx.QKNorm(8, 4, 2, kind="rms")
  nnx.update(layer, nnx.State(variables["params"]))
  for got, want in zip(layer(q, k), linen.apply(variables, q, k)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --- Fused residual add + norm --------------------------------------------------------------


def test_add_norms_match_float64():
  x, scale, bias = data((6, 32), seed=1), data((32,), seed=2), data((32,), seed=3)
  for (add_layer_norm, offsets), (add_rms_norm, _) in zip(
      jit_and_eager(jaxnorm.add_layer_norm, epsilon=0.0),
      jit_and_eager(jaxnorm.add_rms_norm, epsilon=0.0)):
    for offset in offsets:
      residual = data((6, 32), offset)
      y, h = add_layer_norm(x, residual, scale, bias)
      np.testing.assert_array_equal(h, x + residual)
      assert reference.max_error(y, reference.standardize(h, (1,)) * scale + bias) < 1e-4
      y, h = add_rms_norm(x, residual, scale)
      np.testing.assert_array_equal(h, x + residual)
      assert reference.relative_error(y, reference.rms_norm(h, (1,)) * scale) < 1e-5


def test_add_norms_equal_separate_add_then_norm():
  x, residual, scale = data((64, 128), seed=1), data((64, 128), 3.0), data((128,), seed=2)
  y, h = jax.jit(jaxnorm.add_layer_norm)(x, residual, scale, scale)
  np.testing.assert_array_equal(y, jax.jit(jaxnorm.layer_norm)(x + residual, scale, scale))
  y, h = jax.jit(jaxnorm.add_rms_norm)(x, residual, scale)
  np.testing.assert_array_equal(y, jax.jit(jaxnorm.rms_norm)(x + residual, scale))


def test_add_norm_bfloat16_with_float32_residual_stream():
  x, residual = data((4, 64), seed=1), data((4, 64), 1e3)
  y, h = jaxnorm.add_layer_norm(x.astype(jnp.bfloat16), residual, residual_dtype=jnp.float32)
  assert h.dtype == jnp.float32 and y.dtype == jnp.bfloat16
  h_ref = x.astype(jnp.bfloat16).astype(np.float64) + residual
  assert reference.max_error(y, reference.standardize(h_ref, (1,))) < 2e-2
  y, h = jaxnorm.add_rms_norm(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
  assert h.dtype == y.dtype == jnp.bfloat16


def test_add_norm_gradients_vmap_and_errors():
  with jax.enable_x64(True):
    x, residual = data((3, 8), dtype=np.float64), data((3, 8), 20.0, seed=1, dtype=np.float64)
    scale, bias = data((8,), seed=2, dtype=np.float64), data((8,), seed=3, dtype=np.float64)

    def both(x, residual, scale, bias):
      y, h = jaxnorm.add_layer_norm(x, residual, scale, bias, epsilon=1e-3)
      y_rms, _ = jaxnorm.add_rms_norm(x, residual, scale, epsilon=1e-3, scale_offset=1.0)
      return y, h, y_rms

    check_grads(jax.jit(both), (x, residual, scale, bias), order=1, modes=["fwd", "rev"],
                atol=1e-6, rtol=1e-6)
    mapped, whole = jax.jit(lambda *args: (jax.vmap(both, in_axes=(0, 0, None, None))(*args),
                                           both(*args)))(x, residual, scale, bias)
    for got, want in zip(mapped, whole):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="need one shape"):
    jaxnorm.add_layer_norm(jnp.ones((2, 8)), jnp.ones((2, 4)))


def test_add_norm_layers_load_norm_checkpoints_and_agree():
  x, residual = data((4, 16), seed=1), data((4, 16), 1e4)
  params = {"scale": data((16,), seed=2), "bias": data((16,), seed=3)}
  y, h = jnn.AddLayerNorm().apply({"params": params}, x, residual)
  np.testing.assert_array_equal(y, jnn.LayerNorm().apply({"params": params}, x + residual))
  layer = jnnx.AddLayerNorm(16)
  nnx.update(layer, nnx.State(params))
  np.testing.assert_array_equal(layer(x, residual)[0], y)
  scale = {"scale": params["scale"]}
  y, h = jnn.AddRMSNorm().apply({"params": scale}, x, residual)
  np.testing.assert_array_equal(y, jnn.RMSNorm().apply({"params": scale}, x + residual))
  layer = jnnx.AddRMSNorm(16)
  nnx.update(layer, nnx.State(scale))
  np.testing.assert_array_equal(layer(x, residual)[1], h)
