"""The studies in examples/ run once in their quick modes (in a file of their own, so that the
suite's two workers share the examples' time) and show what they claim."""
import json
import re
import sys

from tests.test_examples import EXAMPLES, run_example


def test_precise_bn_quick_exact_statistics_do_not_depend_on_the_order():
  out = run_example("precise_bn.py", "--quick", fast_compile=True)
  assert "| EMA weights, recomputed exactly (shuffled) |" in out, out
  assert len(re.findall(r"\| [\d.]+% \|", out)) == 6, out
  exact = float(re.search(r"exact, class order: ([\d.e+-]+)", out).group(1))
  average = float(re.search(r"average of per-batch values, class order: ([\d.e+-]+)",
                            out).group(1))
  assert exact < 1e-5 and average > 1e-3, out


def test_study_training_loop_learns_mnist1d():
  """The studies' training loop learns MNIST-1D: far above chance after a short run."""
  sys.path.insert(0, str(EXAMPLES))
  try:
    import common
    data = common.mnist1d(1000)
    # weight standardization + GroupNorm: the demo's quick run trains the BatchNorm CNN
    run = common.train(common.CNN(norm="ws_group"), data, batch_size=50, steps=100,
                       learning_rate=1e-2, evaluations=2)
  finally:
    sys.path.remove(str(EXAMPLES))
  assert run.test_accuracy > 0.4  # chance is 0.1
  assert run.curve_loss[-1] < run.curve_loss[0]


def test_demo_quick_writes_report_plots_and_results(tmp_path):
  """One quick demo run covers every study's code: figures, report sections and numbers."""
  out = run_example("demo.py", "--quick", "--out", str(tmp_path), timeout=400)
  assert "Findings:" in out and "Claims against measurements:" in out
  figures = ("wine_loss.png", "mnist1d_batchnorm.png", "batch_size.png", "noisy_bn_curves.png",
             "noisy_bn_inputs.png", "smoothness.png", "lp_smoothness.png")
  for name in ("report.md", "results.json", *figures):
    assert (tmp_path / name).stat().st_size > 0, name
  report = (tmp_path / "report.md").read_text()
  for figure in figures:
    assert f"({figure})" in report, figure
  # the wine study (examples/wine_standardization.py --quick): standardized trains stably
  wine = {line.split(":")[0].strip(): line for line in report.splitlines()
          if "largest stable learning rate" in line}
  assert "never" not in wine["jaxnorm"], report
  for section in ("## 3. Norms against batch size", "## 4a. Noisy batch norm",
                  "## 4b. Smoothness of the loss", "## 4c. Lp spreads",
                  "## Claims against measurements"):
    assert section in report, section
  # the batch-size study: mean ± std over 2 seeds, running and recomputed statistics
  for label in ("BatchNorm", "BatchNorm, recomputed statistics"):
    assert re.search(rf"\| {re.escape(label)} \| [\d.]+ ± [\d.]+ \|", report), label
  # the Santurkar et al. studies: accuracy and the three smoothness measures, finite
  row = re.search(r"\| BatchNorm, L∞ spread \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \| "
                  r"([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \|", report)
  assert row, report
  accuracy, loss_range, grad_change, beta = map(float, row.groups())
  assert 0 <= accuracy <= 100 and loss_range > 0 and grad_change > 0 and beta > 0
  noisy = re.search(r"\| noisy BatchNorm \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| "
                    r"([\d.]+) \| ([\d.]+) \|", report)
  # the noise, resampled every step, moves the probed unit's mean and std over training
  assert float(noisy.group(1)) > 0.1 and float(noisy.group(2)) > 0.1, report
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["santurkar"]) == {"noisy_bn", "smoothness", "lp"}


def test_weight_standardization_quick():
  out = run_example("weight_standardization.py", "--quick", fast_compile=True)
  for label in ("BatchNorm", "GroupNorm(8)", "WS + GroupNorm(8)"):
    assert f"| {label} |" in out, out


def test_qk_norm_study_quick():
  out = run_example("qk_norm_study.py", "--quick")
  assert "| QK-norm |" in out and "| no QK-norm |" in out, out


def test_noisy_batch_norm_moves_each_channel_every_step_and_evaluates_at_the_expectation():
  """Santurkar et al.'s noise: per-channel mean and std off 0 and 1, new at every step."""
  import jax
  import numpy as np
  sys.path.insert(0, str(EXAMPLES))
  try:
    import common
  finally:
    sys.path.remove(str(EXAMPLES))
  x = np.random.default_rng(0).normal(3.0, 2.0, (256, 10, 4)).astype(np.float32)
  layer = common.NoisyBatchNorm(train=True)
  variables = layer.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
  outputs = [np.asarray(layer.apply(variables, x, rngs={"noise": jax.random.key(k)},
                                    mutable=["batch_stats"])[0]) for k in range(2, 6)]
  means = np.stack([y.mean((0, 1)) for y in outputs])  # (steps, channels)
  stds = np.stack([y.std((0, 1)) for y in outputs])
  assert np.abs(means).max() > 0.1 and np.abs(stds - 1).max() > 0.1  # not standardized
  assert np.ptp(means, axis=0).min() > 1e-3 and np.ptp(stds, axis=0).min() > 1e-3  # resampled
  # evaluation: no noise, the expected scale 1 + a and shift b on the running statistics
  y = np.asarray(common.NoisyBatchNorm(train=False).apply(variables, x))
  bn = common.jnn.BatchNorm(use_running_average=True, momentum=0.9)
  reference = np.asarray(bn.apply({"params": variables["params"]["BatchNorm_0"],
                                   "batch_stats": variables["batch_stats"]["BatchNorm_0"]}, x))
  np.testing.assert_allclose(y, 1.5 * reference + 0.5, rtol=1e-5, atol=1e-5)
