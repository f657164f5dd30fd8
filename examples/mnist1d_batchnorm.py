"""Batch norm on MNIST-1D: the same CNN without a norm and with jaxnorm.linen.BatchNorm.

Ioffe and Szegedy (2015) report that batch norm trains faster and tolerates larger learning
rates. This script trains the MNIST-1D baseline CNN (Greydanus 2020 reports 94% held-out
accuracy for it) over a grid of learning rates, with and without BatchNorm, and prints the
held-out accuracy, the steps to reach 90%, and the best learning rate of each.

Run: python examples/mnist1d_batchnorm.py [--quick] [--steps 1000]
"""
from __future__ import annotations

import argparse

import optax

import common

LEARNING_RATES = (1e-3, 1e-2, 3e-2, 1e-1)


def study(*, steps: int, learning_rates=LEARNING_RATES, num_samples: int = 5000,
          target: float = 0.9, progress=None) -> dict:
  """Trains both models at every learning rate; returns {norm: {lr: Run}}."""
  data = common.mnist1d(num_samples)
  runs = {}
  for norm in ("none", "batch"):
    runs[norm] = {}
    for lr in learning_rates:
      trained = common.train_seeds(common.CNN(norm=norm), data, batch_size=100, steps=steps,
                                   optimizer=optax.adam(lr), seeds=1, evaluations=20)
      runs[norm][lr] = common.Run(float(trained.test_accuracy[0]), trained.curve_steps,
                                  trained.curve_accuracy[0], trained.curve_loss[0])
      if progress is not None:
        progress.update(1)
  return runs


def table(runs: dict, target: float = 0.9) -> str:
  """A markdown table: held-out accuracy and steps to ``target`` per norm and learning rate."""
  learning_rates = list(next(iter(runs.values())))
  lines = ["| norm | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " | best lr |",
           "|---" * (len(learning_rates) + 2) + "|"]
  for norm, by_lr in runs.items():
    cells = []
    for lr in learning_rates:
      run = by_lr[lr]
      reached = run.steps_to(target)
      cells.append(f"{100 * run.test_accuracy:.1f}% ({reached if reached else '-'})")
    best = max(by_lr, key=lambda lr: by_lr[lr].test_accuracy)
    label = "BatchNorm" if norm == "batch" else "no norm"
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {best:g} |")
  lines.append(f"\nheld-out accuracy after training (steps to reach {100 * target:.0f}% held-out "
               f"accuracy, '-' if never)")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
  parser.add_argument("--steps", type=int, default=1000)
  args = parser.parse_args(argv)
  if args.quick:
    runs = study(steps=20, learning_rates=(1e-2,), num_samples=500)
  else:
    from tqdm import tqdm
    with tqdm(total=2 * len(LEARNING_RATES), desc="mnist1d batch norm") as progress:
      runs = study(steps=args.steps, progress=progress)
  print(table(runs))
  return runs


if __name__ == "__main__":
  main()
