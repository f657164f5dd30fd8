"""What converting a model-zoo ResNet to jaxnorm changes: error near and far from zero.

A ResNet-18-style flax.linen model (stages 2-2-2-2, widths 4-8-8-16, flax examples/imagenet
layout with plain ``nn.Conv`` and ``nn.BatchNorm``; the stem conv uses 'VALID' padding) is run
in training mode by flax and under ``jaxnorm.linen.use_jaxnorm()``, on images near zero and
offset by 1e4. The exact logits at the offset are the model's logits on the same float32 input
minus the offset (a train-mode batch norm removes the per-channel constant that the 'VALID'
stem conv makes of the offset; the subtraction is exact in float32). Errors are the largest
absolute error over the logits' standard deviation.

Run: python benchmarks/convert_resnet.py [--offset 1e4] [--batch 8]
"""
from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm.linen as jnn

STAGES, WIDTHS = (2, 2, 2, 2), (4, 8, 8, 16)


class Block(nn.Module):
  filters: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9)
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
    y = norm()(conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = norm(name="norm_proj")(conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(WIDTHS[0], (3, 3), padding="VALID", use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9, name="bn_init")(x))
    for i, blocks in enumerate(STAGES):
      for j in range(blocks):
        x = Block(WIDTHS[i], (2, 2) if i > 0 and j == 0 else (1, 1))(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--offset", type=float, default=1e4)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args(argv)
  x = np.random.default_rng(0).normal(size=(args.batch, 16, 16, 3)).astype(np.float32)
  model = ResNet18()
  variables = jax.jit(model.init)(jax.random.key(0), x)
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
  with jnn.use_jaxnorm():
    apply_jaxnorm = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    near_ours, near_stats = apply_jaxnorm(variables, x)
    far = jnp.asarray(x + np.float32(args.offset))
    far_ours, far_stats = apply_jaxnorm(variables, far)
  near_flax, near_flax_stats = apply(variables, x)
  far_flax, _ = apply(variables, far)
  exact, _ = apply(variables, far - np.float32(args.offset))
  spread = float(jnp.std(exact))
  error = lambda a, b: float(jnp.abs(a - b).max()) / spread
  stats_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(near_stats), jax.tree.leaves(near_flax_stats)))
  result = {
      "near zero: jaxnorm vs flax logits": error(near_ours, near_flax),
      "near zero: jaxnorm vs flax batch_stats (max abs)": stats_diff,
      f"offset {args.offset:g}: flax vs exact": error(far_flax, exact),
      f"offset {args.offset:g}: jaxnorm vs exact": error(far_ours, exact),
      f"offset {args.offset:g}: jaxnorm batch_stats finite": float(all(
          bool(jnp.isfinite(s).all()) for s in jax.tree.leaves(far_stats))),
  }
  print(f"ResNet-18-style (stages {STAGES}, widths {WIDTHS}), batch {args.batch}x16x16x3, "
        f"training mode; errors: max abs error / std of the exact logits")
  print("| quantity | value |\n|---|---|")
  for name, value in result.items():
    print(f"| {name} | {value:.3g} |")
  return result


if __name__ == "__main__":
  main()
