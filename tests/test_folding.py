"""Folding batch norm into the layer next to it: float64 references, the unfolded model, PyTorch.

A ResNet-style block (Conv, BN, relu, Conv, BN, plus the skip) with trained-looking statistics is
run unfolded in evaluation mode and folded, in float32 and bfloat16; the folds themselves are
checked against a float64 NumPy reference and against ``torch.nn.utils.fusion``.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx
from tests import reference

torch = reference.import_torch()
RNG = np.random.default_rng(0)


def norm_values(channels, seed=0):
  """Statistics and affine of a trained-looking batch norm: far from (0, 1), with spread."""
  rng = np.random.default_rng(seed)
  return {"mean": rng.normal(3.0, 2.0, channels).astype(np.float32),
          "var": rng.uniform(0.2, 9.0, channels).astype(np.float32),
          "scale": rng.normal(1.0, 0.5, channels).astype(np.float32),
          "bn_bias": rng.normal(0.0, 1.0, channels).astype(np.float32)}


def eval_norm64(y, stats, epsilon):
  """Batch norm in evaluation mode, float64 NumPy."""
  y = np.asarray(y, np.float64)
  scale = 1.0 if stats.get("scale") is None else np.asarray(stats["scale"], np.float64)
  shift = 0.0 if stats.get("bn_bias") is None else np.asarray(stats["bn_bias"], np.float64)
  return (y - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + epsilon) * scale \
      + shift


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
def test_dense_fold_matches_float64(with_bias, with_affine):
  kernel = RNG.normal(size=(5, 4)).astype(np.float32)
  bias = RNG.normal(size=4).astype(np.float32) if with_bias else None
  stats = norm_values(4)
  if not with_affine:
    stats = {"mean": stats["mean"], "var": stats["var"]}
  x = RNG.normal(size=(7, 5))
  new_kernel, new_bias = jaxnorm.fold_batch_norm(kernel, bias, epsilon=1e-3, **stats)
  assert new_kernel.dtype == jnp.float32 and new_bias.dtype == jnp.float32
  expected = eval_norm64(x @ kernel + (0 if bias is None else bias), stats, 1e-3)
  folded = x @ np.asarray(new_kernel, np.float64) + np.asarray(new_bias, np.float64)
  assert reference.relative_error(folded, expected) < 1e-6


def test_fold_under_jit_equals_host():
  kernel = RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)
  stats = norm_values(4)
  host = jaxnorm.fold_batch_norm(kernel, None, **stats)
  traced = jax.jit(lambda k, m, v: jaxnorm.fold_batch_norm(
      k, None, m, v, scale=stats["scale"], bn_bias=stats["bn_bias"]))(
          kernel, stats["mean"], stats["var"])
  for a, b in zip(host, traced):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


def test_matches_torch_fuse_conv_and_linear():
  fusion = torch.nn.utils.fusion
  conv, bn = torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4, eps=1e-3)
  stats = norm_values(4, seed=1)
  with torch.no_grad():
    bn.running_mean[:] = torch.tensor(stats["mean"])
    bn.running_var[:] = torch.tensor(stats["var"])
    bn.weight[:] = torch.tensor(stats["scale"])
    bn.bias[:] = torch.tensor(stats["bn_bias"])
  bn.eval()
  fused = fusion.fuse_conv_bn_eval(conv.eval(), bn)
  kernel = np.moveaxis(conv.weight.detach().numpy(), (0, 1), (-1, -2))  # (out,in,H,W)->(H,W,in,out)
  new_kernel, new_bias = jaxnorm.fold_batch_norm(kernel, conv.bias.detach().numpy(),
                                                 epsilon=1e-3, **stats)
  torch_kernel = np.moveaxis(fused.weight.detach().numpy(), (0, 1), (-1, -2))
  np.testing.assert_allclose(new_kernel, torch_kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_bias, fused.bias.detach().numpy(), rtol=1e-5, atol=1e-5)

  linear, bn1 = torch.nn.Linear(5, 4, bias=False), torch.nn.BatchNorm1d(4)
  with torch.no_grad():
    bn1.running_mean[:] = torch.tensor(stats["mean"])
    bn1.running_var[:] = torch.tensor(stats["var"])
  fused = fusion.fuse_linear_bn_eval(linear.eval(), bn1.eval())
  new_kernel, new_bias = jaxnorm.fold_batch_norm(
      linear.weight.detach().numpy().T, None, stats["mean"], stats["var"],
      scale=bn1.weight.detach().numpy(), bn_bias=bn1.bias.detach().numpy())
  np.testing.assert_allclose(new_kernel, fused.weight.detach().numpy().T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_bias, fused.bias.detach().numpy(), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
  """A ResNet basic block as model zoos write it; ``folded`` drops the norms, adds conv biases."""
  channels: int = 8
  folded: bool = False
  dtype: object = None
  param_dtype: object = jnp.float32
  train: bool = False  # with momentum 0: the running statistics become the batch's

  @nn.compact
  def __call__(self, x):
    conv = lambda name: nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=self.folded,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name: ((lambda y: y) if self.folded else nn.BatchNorm(
        use_running_average=not self.train, momentum=0.0, epsilon=1e-5, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name))
    y = nn.relu(norm("bn1")(conv("conv1")(x)))
    y = norm("bn2")(conv("conv2")(y))
    return nn.relu(y + x)


def trained_block_variables(x, param_dtype=jnp.float32):
  """Random affine and the running statistics of a batch like ``x`` (as after training)."""
  variables = jax.tree.map(np.asarray, Block().init(jax.random.key(0), x))
  for i, name in enumerate(("bn1", "bn2")):
    stats = norm_values(8, seed=10 + i)
    variables["params"][name] = {"scale": stats["scale"], "bias": stats["bn_bias"]}
  calibration = x[::-1] + 0.1 * jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
  _, updates = Block(train=True).apply(variables, calibration, mutable=["batch_stats"])
  variables["batch_stats"] = jax.tree.map(np.asarray, updates["batch_stats"])
  variables["params"] = jax.tree.map(lambda p: p.astype(param_dtype), variables["params"])
  return variables


PAIRS = [("conv1", "bn1"), ("conv2", "bn2")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resnet_block_folded_equals_unfolded(dtype):
  """Folded and unfolded eval outputs agree to the dtype's rounding; in bfloat16 (computation
  and stored parameters) the folded error is no worse than the unfolded one's."""
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(RNG.normal(size=(4, 6, 6, 8)).astype(np.float32)) + 3.0
  variables = trained_block_variables(x, dtype)
  folded_vars = jnn.fold_batch_norms(variables, PAIRS)
  assert "batch_stats" not in folded_vars and "bn1" not in folded_vars["params"]
  assert folded_vars["params"]["conv1"]["kernel"].dtype == dtype
  run = jax.jit(lambda folded, v, x: Block(folded=folded, dtype=dtype, param_dtype=dtype).apply(
      v, x.astype(dtype)), static_argnums=0)
  unfolded = np.asarray(run(False, variables, x), np.float64)
  folded = np.asarray(run(True, folded_vars, x), np.float64)
  if dtype == jnp.float32:
    exact = unfolded  # float32 unfolded is the reference
  else:
    exact = np.asarray(Block().apply(trained_block_variables(x), x), np.float64)
  scale = exact.std()  # errors relative to the spread of the block's output
  unfolded_error = np.abs(unfolded - exact).max() / scale
  folded_error = np.abs(folded - exact).max() / scale
  tolerance = reference.TOLERANCE[dtype.name]
  if dtype == jnp.float32:
    assert folded_error < 10 * tolerance
  else:  # bfloat16 rounding of the kernels and activations, no worse for being folded
    assert unfolded_error < 10 * tolerance
    assert folded_error < 2 * unfolded_error + tolerance


def test_linen_fold_leaves_input_and_fails_whole():
  variables = trained_block_variables(jnp.ones((2, 6, 6, 8)))
  before = jax.tree.map(np.copy, variables)
  with pytest.raises(KeyError, match="'bn3' is not in"):
    jnn.fold_batch_norms(variables, [("conv1", "bn1"), ("conv2", "bn3")])
  with pytest.raises(ValueError, match="no \\(layer, norm\\) pairs"):
    jnn.fold_batch_norms(variables, [])
  jnn.fold_batch_norms(variables, PAIRS)
  jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_bad_shapes_and_axes_raise():
  kernel = np.ones((3, 3, 2, 4), np.float32)
  with pytest.raises(ValueError, match="mean.shape=\\(2,\\) does not match the 4 output"):
    jaxnorm.fold_batch_norm(kernel, None, np.zeros(2), np.ones(2))
  with pytest.raises(ValueError, match="bias.shape=\\(3,\\)"):
    jaxnorm.fold_batch_norm(kernel, np.zeros(3), np.zeros(4), np.ones(4))
  with pytest.raises(ValueError, match="axis=1 is not the channel axis"):
    jaxnorm.fold_batch_norm(kernel, None, np.zeros(4), np.ones(4), axis=1)
  jaxnorm.fold_batch_norm(kernel, None, np.zeros(4), np.ones(4), axis=3)  # the last of rank 4
  with pytest.raises(ValueError, match="grouped conv"):
    jaxnorm.fold_preceding_batch_norm(kernel, None, np.zeros(4), np.ones(4))


def preceding_case(padding):
  """(norm then conv) unfolded and folded, in float64 via jax.lax on float32 values."""
  stats = norm_values(3, seed=5)
  kernel = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
  bias = RNG.normal(size=4).astype(np.float32)
  x = RNG.normal(3.0, 2.0, size=(2, 7, 7, 3)).astype(np.float32)
  conv = lambda v, k, b: jax.lax.conv_general_dilated(
      v, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  unfolded = conv(eval_norm64(x, stats, 1e-5).astype(np.float32), kernel, bias)
  new_kernel, new_bias = jaxnorm.fold_preceding_batch_norm(kernel, bias, padding=padding,
                                                           **stats)
  return conv(x, new_kernel, new_bias), unfolded


def test_preceding_fold_valid_conv_and_dense():
  folded, unfolded = preceding_case("VALID")
  assert reference.relative_error(folded, unfolded) < 1e-5
  stats = norm_values(5, seed=6)
  kernel = RNG.normal(size=(5, 2)).astype(np.float32)
  x = RNG.normal(size=(4, 5))
  new_kernel, new_bias = jaxnorm.fold_preceding_batch_norm(kernel, None, **stats)
  expected = eval_norm64(x, stats, 1e-5) @ kernel
  assert reference.relative_error(x @ np.asarray(new_kernel, np.float64) + new_bias,
                                  expected) < 1e-5


def test_preceding_fold_refuses_zero_padding():
  """A 'SAME' conv pads the normalized input with zeros: the fold would change the borders."""
  with pytest.raises(ValueError, match="padding='SAME' cannot fold exactly"):
    preceding_case("SAME")
  stats = norm_values(3, seed=5)
  kernel = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
  new_kernel, new_bias = jaxnorm.fold_preceding_batch_norm(kernel, None, **stats)  # 'VALID'
  # What the refused fold would give with 'SAME': wrong on the border, right inside.
  x = RNG.normal(3.0, 2.0, size=(1, 7, 7, 3)).astype(np.float32)
  conv = lambda v, k: jax.lax.conv_general_dilated(v, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  wrong = np.asarray(conv(x, new_kernel) + new_bias)
  right = np.asarray(conv(eval_norm64(x, stats, 1e-5).astype(np.float32), kernel))
  assert np.abs(wrong - right)[0, 1:-1, 1:-1].max() < 1e-3
  assert np.abs(wrong - right)[0, 0].max() > 1e-2


def test_nnx_fold_into_layer_and_next_layer():
  rngs = nnx.Rngs(0)
  conv, norm = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
  stats = norm_values(4, seed=7)
  norm.mean[...], norm.var[...] = stats["mean"], stats["var"]
  norm.scale[...], norm.bias[...] = stats["scale"], stats["bn_bias"]
  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)).astype(np.float32))
  folded = jnnx.fold_into_layer(conv, norm)
  assert isinstance(folded, nnx.Conv) and folded.use_bias and conv.bias is None
  expected = norm(conv(x), use_running_average=True)
  assert reference.relative_error(folded(x), expected) < 1e-5

  dense_norm, dense = jnnx.BatchNorm(3), nnx.Linear(3, 2, rngs=rngs)
  dense_norm.mean[...], dense_norm.var[...] = norm_values(3)["mean"], norm_values(3)["var"]
  folded = jnnx.fold_into_next_layer(dense_norm, dense)
  v = jnp.asarray(RNG.normal(size=(5, 3)).astype(np.float32))
  expected = dense(dense_norm(v, use_running_average=True))
  assert isinstance(folded, nnx.Linear)
  assert reference.relative_error(folded(v), expected) < 1e-5
  with pytest.raises(ValueError, match="padding='SAME' cannot fold"):
    jnnx.fold_into_next_layer(nnx.BatchNorm(3, rngs=rngs), conv)
