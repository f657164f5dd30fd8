"""Batch norm with L1 and L∞ spreads in place of the standard deviation (``LpBatchNorm``).

Santurkar et al. (2018, section 3.3) divide by the L1 norm or the L∞ norm of the centred batch
instead of its standard deviation and find performance and smoothness similar to batch norm.
This script trains the MNIST-1D CNN of common.py with ``jaxnorm.linen.LpBatchNorm`` at p = 1
and p = ∞, against BatchNorm (p = 2) and no norm, in the setting of smoothness_study.py (plain
SGD, one learning rate, 3 seeds), and reports held-out accuracy and the smoothness measures.

Run: python examples/lp_batchnorm_study.py [--quick] [--steps 1000] [--out outputs/lp]
"""
from __future__ import annotations

import pathlib

import common
import smoothness_study

NORMS = ("none", "batch", "lp1", "lpinf")
STEPS = 1000


def table(runs: dict) -> str:
  """Markdown: accuracy and the smoothness measures, mean ± std over seeds."""
  return smoothness_study.table({norm: runs[norm] for norm in NORMS if norm in runs})


def figures(runs: dict, out: pathlib.Path) -> list[str]:
  """The smoothness figure for the four models."""
  return smoothness_study.figures({norm: runs[norm] for norm in NORMS if norm in runs}, out,
                                  name="lp_smoothness.png")


def main(argv=None) -> dict:
  return common.sgd_study_main(argv, description=__doc__.splitlines()[0], norms=NORMS,
                               quick_norms=("lp1", "lpinf"), probe="smoothness", default_steps=STEPS,
                               table=table, figures=figures)


if __name__ == "__main__":
  main()
