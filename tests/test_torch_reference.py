"""jaxnorm against PyTorch's own norms, an independent implementation, where PyTorch is installed.

PyTorch computes in float64 here; jaxnorm's float32 results must agree to float32 accuracy, for
the outputs and for the gradients of input, scale and bias. Each case runs under ``jit``; the
eager variant (chex ``without_jit``) runs one rows op and one per-channel op, since eager
dispatch compiles every primitive on its own (over a hundred compiles for one op's gradient).
PyTorch's running variance averages the unbiased batch variance, as jaxnorm's does: that is
compared too.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
from tests import reference

torch = reference.import_torch()  # skips where PyTorch is absent; under CI=true, fails instead
F = torch.nn.functional


def nhwc_to_nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def nchw_to_nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def torch_reference(op, x, scale, bias, cotangent):
  """Output and gradients (x, scale, bias) of PyTorch's op in float64, channels last."""
  channels = x.shape[-1]
  channels_first = x.ndim > 2 and op != "layer_norm"
  to_torch = nhwc_to_nchw if channels_first else torch.from_numpy
  from_torch = nchw_to_nhwc if channels_first else (lambda t: t.detach().numpy())
  xt = to_torch(x.astype(np.float64)).requires_grad_(True)
  st = torch.from_numpy(scale.astype(np.float64)).requires_grad_(True)
  bt = torch.from_numpy(bias.astype(np.float64)).requires_grad_(True)
  if op == "layer_norm":
    y = F.layer_norm(xt, (channels,), st, bt, 1e-6)
  elif op == "rms_norm":
    y = F.rms_norm(xt, (channels,), st, 1e-6) + 0 * bt.sum()
  elif op == "group_norm":
    y = F.group_norm(xt, 4, st, bt, 1e-6)
  elif op == "instance_norm":
    y = F.instance_norm(xt, weight=st, bias=bt, eps=1e-6)
  elif op == "batch_norm":
    y = F.batch_norm(xt, None, None, st, bt, training=True, eps=1e-5)
  y.backward(to_torch(cotangent.astype(np.float64)))
  return from_torch(y), from_torch(xt.grad), st.grad.numpy(), bt.grad.numpy()


def jaxnorm_op(op):
  if op == "layer_norm":
    return lambda x, s, b: jaxnorm.layer_norm(x, s, b)
  if op == "rms_norm":
    return lambda x, s, b: jaxnorm.rms_norm(x, s) + 0 * b.sum()
  if op == "group_norm":
    return lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=4)
  if op == "instance_norm":
    return lambda x, s, b: jaxnorm.instance_norm(x, s, b)
  if op == "batch_norm":
    return lambda x, s, b: jaxnorm.batch_norm(x, None, s, b, training=True)[0]
  raise ValueError(op)


SHAPES = {"layer_norm": (6, 32), "rms_norm": (6, 32), "group_norm": (3, 5, 4, 8),
          "instance_norm": (3, 5, 4, 8), "batch_norm": (4, 5, 3, 8)}
EAGER_OPS = ("layer_norm", "batch_norm")  # the same code as under jit: two families suffice


class TestAgainstTorch(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_outputs_and_gradients(self):
    rng = np.random.default_rng(0)
    eager = self.variant.type is chex.ChexVariantType.WITHOUT_JIT
    for op, shape in SHAPES.items():
      if eager and op not in EAGER_OPS:
        continue
      x = (rng.standard_normal(shape) * 2 + 50).astype(np.float32)
      scale = rng.standard_normal(shape[-1]).astype(np.float32)
      bias = rng.standard_normal(shape[-1]).astype(np.float32)
      cotangent = rng.standard_normal(shape).astype(np.float32)
      fn = jaxnorm_op(op)

      @self.variant
      def forward_and_grads(x, s, b, g):
        y, pullback = jax.vjp(fn, x, s, b)
        return (y, *pullback(g))

      expected = torch_reference(op, x, scale, bias, cotangent)
      actual = forward_and_grads(x, scale, bias, cotangent)
      for name, a, e in zip(("y", "dx", "dscale", "dbias"), actual, expected):
        scale_of = 1 + np.abs(e).max()
        np.testing.assert_allclose(np.asarray(a, np.float64) / scale_of, e / scale_of,
                                   atol=2e-5, err_msg=f"{op}: {name}")


def test_running_statistics_match_torch_batch_norm():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((2, 3, 3, 4)) * 3 + 7).astype(np.float32)
  running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.ones(4,
                                                                             dtype=torch.float64)
  running = jaxnorm.init_batch_stats(4)
  train = jax.jit(functools.partial(jaxnorm.batch_norm, training=True, momentum=0.9))
  for step in range(3):
    batch = x + step
    F.batch_norm(nhwc_to_nchw(batch.astype(np.float64)), running_mean, running_var,
                 training=True, momentum=0.1)
    # PyTorch's momentum is the weight of the new batch; flax's and jaxnorm's that of the old.
    _, running = train(batch, running)
  np.testing.assert_allclose(running.mean, running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(running.var, running_var.numpy(), rtol=1e-5)


def test_layer_norm_traces_once_per_shape():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def norm(x):
    return jaxnorm.layer_norm(x)

  for seed in range(3):
    norm(jnp.asarray(np.random.default_rng(seed).standard_normal((4, 8)), jnp.float32))
