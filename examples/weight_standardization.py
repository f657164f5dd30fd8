"""Weight standardization + GroupNorm against BatchNorm and GroupNorm alone, at small batches.

Qiao et al. (2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization") standardize each convolution's kernel and pair it with GroupNorm, so that
nothing depends on the batch; BiT (Kolesnikov et al. 2020) and NF-Nets use the same recipe. This
script trains the MNIST-1D CNN of examples/common.py with BatchNorm, GroupNorm(8), and
``jaxnorm.linen.StdConv`` + GroupNorm(8), at batch sizes 2, 8 and 32 (the same number of
examples seen, Adam with the square-root learning-rate rule), over several seeds, and prints
held-out accuracy, mean ± standard deviation over the seeds.

Run: python examples/weight_standardization.py [--quick] [--epochs 8] [--seeds 3]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import numpy as np

import common
import jaxnorm.linen as jnn

SETTINGS = {"batch": "BatchNorm", "group": "GroupNorm(8)", "ws_group": "WS + GroupNorm(8)"}
BATCH_SIZES = (2, 8, 32)


class CNN(nn.Module):
  """common.CNN's network; ``norm="ws_group"`` standardizes every convolution's kernel."""
  norm: str = "batch"
  channels: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    standardized = self.norm == "ws_group"
    for kernel in (5, 3, 3):
      conv = jnn.StdConv if standardized else nn.Conv
      x = conv(self.channels, (kernel,), strides=2, use_bias=False)(x)
      x = common.make_norm("group" if standardized else self.norm, train)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def learning_rate(batch_size: int) -> float:
  """Adam's step size: the square-root scaling rule, 3e-3 at batch 32."""
  return 3e-3 * (batch_size / 32) ** 0.5


def study(*, epochs: float, batch_sizes=BATCH_SIZES, seeds: int = 3,
          num_samples: int = 5000) -> dict:
  """Held-out accuracy of every setting: {norm: {batch_size: [accuracy per seed]}}."""
  data = common.mnist1d(num_samples)
  results = {norm: {bs: [] for bs in batch_sizes} for norm in SETTINGS}
  for batch_size in batch_sizes:
    steps = max(1, int(epochs * len(data["x"]) / batch_size))
    for norm in SETTINGS:
      for seed in range(seeds):
        run = common.train(CNN(norm=norm), data, batch_size=batch_size, steps=steps,
                           learning_rate=learning_rate(batch_size), seed=seed, evaluations=1)
        results[norm][batch_size].append(run.test_accuracy)
  return results


def table(results: dict) -> str:
  """A markdown table: held-out accuracy (%), mean ± std over seeds, per norm and batch size."""
  batch_sizes = list(next(iter(results.values())))
  lines = ["| norm | " + " | ".join(f"batch {bs}" for bs in batch_sizes) + " |",
           "|---" * (len(batch_sizes) + 1) + "|"]
  for norm, by_size in results.items():
    cells = [f"{100 * np.mean(a):.1f} ± {100 * np.std(a):.1f}" for a in by_size.values()]
    lines.append(f"| {SETTINGS[norm]} | " + " | ".join(cells) + " |")
  seeds = len(next(iter(next(iter(results.values())).values())))
  lines.append(f"\nheld-out accuracy (%) on MNIST-1D, mean ± std over {seeds} seed(s)")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
  parser.add_argument("--epochs", type=float, default=8)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args(argv)
  start = time.time()
  if args.quick:
    results = study(epochs=0.05, batch_sizes=(4,), seeds=1, num_samples=500)
  else:
    results = study(epochs=args.epochs, seeds=args.seeds)
  print(table(results))
  print(f"({time.time() - start:.0f} s)")
  return results


if __name__ == "__main__":
  main()
