"""Noisy batch norm: does a stable distribution of each layer's inputs explain batch norm?

Santurkar et al. (2018, "How Does Batch Normalization Help Optimization?", figure 2) add noise
after batch norm that changes every step, with a non-zero mean and a non-unit variance, so each
layer's inputs are no longer stable ("internal covariate shift" restored on purpose), and find
that the network still trains about as well as with plain batch norm, and much better than
without a norm. This script trains the MNIST-1D CNN of common.py without a norm, with
BatchNorm and with ``common.NoisyBatchNorm``, with plain SGD at one learning rate, over 3
seeds, and records one unit's inputs to the third convolution along training.

Run: python examples/noisy_bn_study.py [--quick] [--steps 1000] [--out outputs/noisy_bn]
"""
from __future__ import annotations

import pathlib

import numpy as np

import common

NORMS = ("none", "batch", "noisy")
LABELS = {"none": "no norm", "batch": "BatchNorm", "noisy": "noisy BatchNorm"}
STEPS = 1000


def summary(runs: dict) -> dict:
  """Per norm: held-out accuracy and final training loss, per seed, and the input drift."""
  out = {}
  for norm in NORMS:
    if norm not in runs:
      continue
    run = runs[norm]
    inputs = run.probes["layer_inputs"]  # (seeds, evaluations, values)
    out[norm] = {"accuracy": (100 * run.test_accuracy).tolist(),
                 "train_loss": run.curve_loss[:, -1].tolist(),
                 # how far the unit's mean and std move between evaluation points
                 "input_mean_range": float(np.ptp(inputs.mean(-1), axis=1).mean()),
                 "input_std_range": float(np.ptp(inputs.std(-1), axis=1).mean())}
  return out


def table(runs: dict) -> str:
  """Markdown: accuracy, loss and the drift of the probed unit's input distribution."""
  lines = ["| model | held-out accuracy (%) | final training loss | unit input: range of its mean "
           "over training | range of its std |", "|---|---|---|---|---|"]
  for norm, row in summary(runs).items():
    lines.append(f"| {LABELS[norm]} | {common.mean_std(row['accuracy'])} | "
                 f"{np.mean(row['train_loss']):.3f} ± {np.std(row['train_loss']):.3f} | "
                 f"{row['input_mean_range']:.2f} | {row['input_std_range']:.2f} |")
  seeds = len(next(iter(runs.values())).test_accuracy)
  lines.append(f"\nMNIST-1D CNN, SGD lr {common.SGD_LEARNING_RATE:g}, batch "
               f"{common.SGD_BATCH_SIZE}, mean ± std over {seeds} seeds; the unit is channel 0 "
               f"of the second norm's output (input of the third convolution), in training mode")
  return "\n".join(lines)


def figures(runs: dict, out: pathlib.Path) -> list[str]:
  """Training curves (mean ± std bands), and the densities of the probed unit's inputs."""
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for norm in NORMS:
    if norm in runs:
      run = runs[norm]
      common.mean_std_band(left, run.curve_steps, run.curve_loss, LABELS[norm])
      common.mean_std_band(right, run.curve_steps, 100 * run.curve_accuracy, LABELS[norm])
  left.set(title="training loss", xlabel="step", yscale="log")
  right.set(title="held-out accuracy (%)", xlabel="step")
  left.legend()
  fig.tight_layout()
  fig.savefig(out / "noisy_bn_curves.png", dpi=110)
  plt.close(fig)
  shown = [norm for norm in ("batch", "noisy") if norm in runs]
  fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
  for axis, norm in zip(axes[0], shown):
    run = runs[norm]
    inputs = run.probes["layer_inputs"][0]  # seed 0: (evaluations, values)
    colors = plt.cm.viridis(np.linspace(0, 1, len(inputs)))
    low, high = np.percentile(inputs, [0.5, 99.5])
    bins = np.linspace(low, high, 60)
    for step, values, color in zip(run.curve_steps, inputs, colors):
      density, edges = np.histogram(values, bins=bins, density=True)
      axis.plot((edges[:-1] + edges[1:]) / 2, density, color=color, label=f"step {step}")
    axis.set(title=f"{LABELS[norm]}: one unit's inputs over training", xlabel="activation",
             ylabel="density")
    axis.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "noisy_bn_inputs.png", dpi=110)
  plt.close(fig)
  return ["noisy_bn_curves.png", "noisy_bn_inputs.png"]


def main(argv=None) -> dict:
  return common.sgd_study_main(argv, description=__doc__.splitlines()[0], norms=NORMS,
                               quick_norms=("batch", "noisy"), probe="layer_inputs", default_steps=STEPS,
                               table=table, figures=figures)


if __name__ == "__main__":
  main()
