"""Does batch norm make the loss smoother? Loss landscape, gradient predictiveness, β-smoothness.

Santurkar et al. (2018, figures 3 and 4): at points along training, step along the gradient
with several step sizes; with batch norm the loss varies less along the step (loss landscape),
the gradient changes less (gradient predictiveness), and the largest ratio of gradient change to
step length (effective β-smoothness) is smaller than without a norm, at the same learning rate.
This script trains the MNIST-1D CNN of common.py without a norm and with BatchNorm (plain SGD,
one learning rate, 3 seeds) and measures the three at 10 points of training with
``common.smoothness_probe`` (steps of 0.5, 1, 2 and 4 learning rates).

Run: python examples/smoothness_study.py [--quick] [--steps 1000] [--out outputs/smoothness]
"""
from __future__ import annotations

import pathlib

import numpy as np

import common

NORMS = ("none", "batch")
LABELS = {"none": "no norm", "batch": "BatchNorm", "noisy": "noisy BatchNorm",
          "lp1": "BatchNorm, L1 spread", "lpinf": "BatchNorm, L∞ spread"}
STEPS = 1000


def measures(run: common.SeedRuns) -> dict[str, np.ndarray]:
  """Per seed and evaluation point: loss range, largest gradient change, β-smoothness."""
  probed = run.probes["smoothness"]
  return {"loss_range": np.ptp(probed["loss"], axis=-1),
          "grad_change": probed["grad_change"].max(-1), "beta": probed["beta"]}


def summary(runs: dict) -> dict:
  """Per norm: each measure averaged over training points, per seed; held-out accuracy."""
  out = {}
  for norm, run in runs.items():
    row = {name: values.mean(1).tolist() for name, values in measures(run).items()}
    row["accuracy"] = (100 * run.test_accuracy).tolist()
    out[norm] = row
  return out


def table(runs: dict) -> str:
  """Markdown: the three measures (mean over training points), mean ± std over seeds."""
  lines = ["| model | held-out accuracy (%) | loss range along the gradient | max ℓ2 gradient "
           "change | effective β-smoothness |", "|---|---|---|---|---|"]
  for norm, row in summary(runs).items():
    lines.append(f"| {LABELS[norm]} | {common.mean_std(row['accuracy'])} | "
                 f"{np.mean(row['loss_range']):.3f} ± {np.std(row['loss_range']):.3f} | "
                 f"{np.mean(row['grad_change']):.2f} ± {np.std(row['grad_change']):.2f} | "
                 f"{np.mean(row['beta']):.1f} ± {np.std(row['beta']):.1f} |")
  seeds = len(next(iter(runs.values())).test_accuracy)
  lines.append(f"\nsteps of {', '.join(map(str, common.STEP_SCALES))} × lr "
               f"{common.SGD_LEARNING_RATE:g} along the gradient of a batch of "
               f"{common.SGD_BATCH_SIZE}, at each evaluation point; the measures averaged over "
               f"the points, mean ± std over {seeds} seeds")
  return "\n".join(lines)


def figures(runs: dict, out: pathlib.Path, name: str = "smoothness.png") -> list[str]:
  """Their figure 4: per measure, the band over step sizes (loss, gradient change) or seeds."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for norm, run in runs.items():
    probed = run.probes["smoothness"]
    steps = run.curve_steps
    # loss and gradient change: mean over seeds, band from the smallest to the largest step
    loss = probed["loss"].mean(0)
    (line,) = axes[0].plot(steps, loss[:, 0], label=LABELS[norm])
    axes[0].fill_between(steps, loss.min(-1), loss.max(-1), color=line.get_color(), alpha=0.25)
    change = probed["grad_change"].mean(0)
    axes[1].plot(steps, change.mean(-1), color=line.get_color(), label=LABELS[norm])
    axes[1].fill_between(steps, change.min(-1), change.max(-1), color=line.get_color(),
                         alpha=0.25)
    common.mean_std_band(axes[2], steps, probed["beta"], LABELS[norm], color=line.get_color())
  axes[0].set(title="loss landscape: loss along the gradient", xlabel="step", ylabel="loss",
              yscale="log")
  axes[1].set(title="gradient predictiveness: ℓ2 gradient change", xlabel="step",
              yscale="log")
  axes[2].set(title="effective β-smoothness (mean ± std, seeds)", xlabel="step")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out / name, dpi=110)
  plt.close(fig)
  return [name]


def main(argv=None) -> dict:
  return common.sgd_study_main(argv, description=__doc__.splitlines()[0], norms=NORMS,
                               quick_norms=NORMS, probe="smoothness", default_steps=STEPS,
                               table=table, figures=figures)


if __name__ == "__main__":
  main()
