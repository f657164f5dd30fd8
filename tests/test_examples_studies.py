"""The studies in examples/ run once in their quick modes (in a file of their own, so that the
suite's two workers share the examples' time) and show what they claim."""
import re
import sys

from tests.test_examples import EXAMPLES, run_example


def test_precise_bn_quick_exact_statistics_do_not_depend_on_the_order():
  out = run_example("precise_bn.py", "--quick")
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
    run = common.train(common.CNN(norm="batch"), data, batch_size=50, steps=200,
                       learning_rate=1e-2, evaluations=2)
  finally:
    sys.path.remove(str(EXAMPLES))
  assert run.test_accuracy > 0.4  # chance is 0.1
  assert run.curve_loss[-1] < run.curve_loss[0]


def test_demo_quick_writes_report_plots_and_results(tmp_path):
  out = run_example("demo.py", "--quick", "--out", str(tmp_path), timeout=400)
  assert "Findings:" in out
  for name in ("report.md", "results.json", "wine_loss.png", "mnist1d_batchnorm.png",
               "batch_size.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  report = (tmp_path / "report.md").read_text()
  assert "## 3. Norms against batch size" in report and "![batch size](batch_size.png)" in report
  # the studies of mnist1d_batchnorm.py and batch_size_study.py, as their --quick modes run them
  for label in ("no norm", "BatchNorm", "BatchRenorm", "GroupNorm(8)", "LayerNorm"):
    assert f"| {label} |" in report, label


def test_weight_standardization_quick():
  out = run_example("weight_standardization.py", "--quick")
  for label in ("BatchNorm", "GroupNorm(8)", "WS + GroupNorm(8)"):
    assert f"| {label} |" in out, out


def test_qk_norm_study_quick():
  out = run_example("qk_norm_study.py", "--quick")
  assert "| QK-norm |" in out and "| no QK-norm |" in out, out
