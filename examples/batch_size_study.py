"""Held-out accuracy against batch size: BatchNorm, BatchRenorm, GroupNorm and LayerNorm.

Wu and He (2018, "Group Normalization", figure 1) found batch norm's ImageNet error rising from
23.6% at 32 images per GPU to 34.7% at 2, while group norm stayed between 24.0% and 24.2%. Ioffe
(2017) proposed Batch Renormalization for the same small-batch regime. This script trains the
MNIST-1D CNN with each norm at each batch size, for the same number of examples seen, and prints
held-out error, so the shape of the curves can be compared with those papers.

Run: python examples/batch_size_study.py [--quick] [--epochs 8]
"""
from __future__ import annotations

import argparse

import common

NORMS = ("batch", "renorm", "group", "layer")
LABELS = {"batch": "BatchNorm", "renorm": "BatchRenorm", "group": "GroupNorm(8)",
          "layer": "LayerNorm"}
BATCH_SIZES = (2, 4, 8, 32, 128)


def learning_rate(batch_size: int) -> float:
  """Adam's step size for a batch size: the square-root scaling rule, 3e-3 at 32."""
  return 3e-3 * (batch_size / 32) ** 0.5


def study(*, epochs: float, batch_sizes=BATCH_SIZES, norms=NORMS, num_samples: int = 5000,
          progress=None) -> dict:
  """Trains every norm at every batch size for ``epochs`` epochs; returns {norm: {bs: Run}}."""
  data = common.mnist1d(num_samples)
  runs = {norm: {} for norm in norms}
  for batch_size in batch_sizes:
    steps = max(1, int(epochs * len(data["x"]) / batch_size))
    # Renorm: plain batch norm for the first tenth, clips relaxed over the next half.
    renorm_steps = (steps // 10, steps // 2)
    for norm in norms:
      model = common.CNN(norm=norm, renorm_steps=renorm_steps)
      runs[norm][batch_size] = common.train(model, data, batch_size=batch_size, steps=steps,
                                            learning_rate=learning_rate(batch_size))
      if progress is not None:
        progress.update(1)
  return runs


def table(runs: dict) -> str:
  """A markdown table of held-out error (%) per norm and batch size."""
  batch_sizes = list(next(iter(runs.values())))
  lines = ["| norm | " + " | ".join(f"batch {bs}" for bs in batch_sizes) + " |",
           "|---" * (len(batch_sizes) + 1) + "|"]
  for norm, by_size in runs.items():
    cells = [f"{100 * (1 - by_size[bs].test_accuracy):.1f}" for bs in batch_sizes]
    lines.append(f"| {LABELS[norm]} | " + " | ".join(cells) + " |")
  lines.append("\nheld-out error (%) on MNIST-1D after the same number of examples seen")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
  parser.add_argument("--epochs", type=float, default=8)
  args = parser.parse_args(argv)
  if args.quick:
    runs = study(epochs=0.05, batch_sizes=(4,), num_samples=500)
  else:
    from tqdm import tqdm
    with tqdm(total=len(NORMS) * len(BATCH_SIZES), desc="batch size study") as progress:
      runs = study(epochs=args.epochs, progress=progress)
  print(table(runs))
  return runs


if __name__ == "__main__":
  main()
