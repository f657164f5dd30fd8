"""Batch norm folded into the conv before it: inference time and error of a small CNN.

A ResNet-style CNN (stem conv, BN, relu; residual blocks of conv, BN, relu, conv, BN plus the
skip; global pooling and a Dense head), with random weights and running statistics set from a
calibration batch, is run in evaluation mode under ``jit``, unfolded (flax.linen's BatchNorm)
and folded (``jaxnorm.linen.fold_batch_norms``: each BN in its conv's kernel and bias). The two
take turns within each round, after a warm-up; the table gives medians over rounds, the ratio
(median of per-round ratios), compile times, XLA's planned bytes, and the largest error of
each output against the unfolded float32 model, relative to the logits' spread.

Run: python benchmarks/fold.py [--quick] [--rounds 15] [--batch 64] [--size 32] [--width 32]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm.linen as jnn


class CNN(nn.Module):
  width: int = 32
  blocks: int = 3
  folded: bool = False
  train: bool = False
  dtype: object = None

  def conv(self, name, strides=(1, 1)):
    return nn.Conv(self.width, (3, 3), strides, use_bias=self.folded, dtype=self.dtype,
                   name=name)

  def norm(self, name):
    if self.folded:
      return lambda y: y
    return nn.BatchNorm(use_running_average=not self.train, momentum=0.0, dtype=self.dtype,
                        name=name)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm("bn_stem")(self.conv("conv_stem", (2, 2))(x)))
    for i in range(self.blocks):
      y = nn.relu(self.norm(f"bn{i}a")(self.conv(f"conv{i}a")(x)))
      x = nn.relu(x + self.norm(f"bn{i}b")(self.conv(f"conv{i}b")(y)))
    return nn.Dense(10, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


def pairs(blocks: int):
  return [("conv_stem", "bn_stem")] + [(f"conv{i}{s}", f"bn{i}{s}") for i in range(blocks)
                                       for s in "ab"]


def trained_variables(model: CNN, x):
  """Random weights, random BN affine, and running statistics of a calibration batch."""
  variables = jax.jit(model.init)(jax.random.key(0), x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(np.asarray, variables["params"])
  for _, norm in pairs(model.blocks):
    params[norm] = {"scale": rng.normal(1.0, 0.3, model.width).astype(np.float32),
                    "bias": rng.normal(0.0, 0.5, model.width).astype(np.float32)}
  calibrate = CNN(model.width, model.blocks, train=True)
  _, updates = jax.jit(lambda v, x: calibrate.apply(v, x, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": variables["batch_stats"]}, x)
  return {"params": params, "batch_stats": updates["batch_stats"]}


def timed(fn, args, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def planned_bytes(fn, args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["bytes accessed"])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds (for tests)")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--width", type=int, default=32)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.batch, args.size, args.width = 3, 4, 8, 8
  x = jnp.asarray(np.random.default_rng(0).normal(0.5, 1.0, (args.batch, args.size, args.size, 3)),
                  jnp.float32)
  unfolded_model = CNN(args.width)
  variables = trained_variables(unfolded_model, x)
  folded_vars = jnn.fold_batch_norms(variables, pairs(unfolded_model.blocks))
  runs = {}
  for name, model, tree in (("unfolded", unfolded_model, variables),
                            ("folded", CNN(args.width, folded=True), folded_vars)):
    fn = jax.jit(model.apply)
    start = time.perf_counter()
    jax.block_until_ready(fn(tree, x))
    runs[name] = {"fn": fn, "args": (tree, x), "compile_s": time.perf_counter() - start,
                  "bytes": planned_bytes(fn, (tree, x)), "times": []}
  reference = np.asarray(runs["unfolded"]["fn"](variables, x), np.float64)
  spread = reference.std()
  errors = {"folded float32": np.abs(np.asarray(runs["folded"]["fn"](folded_vars, x))
                                     - reference).max() / spread}
  for name, model, tree in (("unfolded bfloat16", CNN(args.width, dtype=jnp.bfloat16), variables),
                            ("folded bfloat16", CNN(args.width, folded=True, dtype=jnp.bfloat16),
                             folded_vars)):
    out = np.asarray(jax.jit(model.apply)(tree, x).astype(jnp.float32), np.float64)
    errors[name] = np.abs(out - reference).max() / spread
  calls = 3 if args.quick else 20
  for run in runs.values():
    timed(run["fn"], run["args"], calls)  # warm-up
  ratios = []
  for _ in range(args.rounds):
    round_times = {}
    for name, run in runs.items():
      round_times[name] = timed(run["fn"], run["args"], calls)
      run["times"].append(round_times[name])
    ratios.append(round_times["folded"] / round_times["unfolded"])
  print(f"fold.py on {platform.machine()} {jax.devices()[0].device_kind}, batch {args.batch}x"
        f"{args.size}x{args.size}x3, width {args.width}, {len(pairs(3))} conv+BN pairs, "
        f"{args.rounds} rounds of {calls} calls")
  print("| model | median ms | compile s | planned MB |")
  print("|---|---|---|---|")
  for name, run in runs.items():
    print(f"| {name} | {1e3 * statistics.median(run['times']):.3f} | {run['compile_s']:.2f} "
          f"| {run['bytes'] / 1e6:.2f} |")
  ratio = statistics.median(ratios)
  print(f"folded / unfolded time: {ratio:.3f} (median of per-round ratios)")
  print("| output | max abs error / std of the float32 unfolded logits |")
  print("|---|---|")
  for name, error in errors.items():
    print(f"| {name} | {error:.2e} |")
  return {"ratio": ratio, "errors": errors}


if __name__ == "__main__":
  main()
