"""benchmarks/accuracy.py and benchmarks/stats_cost.py run in quick mode and print their tables.

No timing is asserted: only that the scripts run, print what they promise, and that the accuracy
table shows what the issue asks (jaxnorm within 1e-4 of float64 at every offset, flax's default
far off from 1e4). flax's side is a test of what flax should do, marked as an expected failure
(non-strict) with the defect of the version pinned in constraints.txt, so that an upstream fix
does not fail the suite.
"""
import contextlib
import importlib.util
import io
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def accuracy_quick():
  """benchmarks/accuracy.py --quick, run once for the tests below: its tables and its output."""
  accuracy = load("accuracy")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = accuracy.main(["--quick"])
  return results, out.getvalue()


def test_accuracy_quick_table(accuracy_quick):
  results, out = accuracy_quick
  assert out.count("| float32 | 1e") == 24 and out.count("| bfloat16 | 1e") == 24, out
  for kind in ("LayerNorm", "LayerNorm rows", "BatchNorm"):
    table = results[kind]
    assert [offset for dtype, offset in table if dtype == "float32"] == [
        10.0 ** k for k in range(8)]
    for (dtype, offset), row in table.items():
      assert row["jaxnorm reduce_moments"] < 1e-4, (kind, dtype, offset, row)
      assert row["jaxnorm layer"] < 1e-4, (kind, dtype, offset, row)


@pytest.mark.xfail(strict=False, raises=AssertionError,
                   reason="flax 0.12.8 defect: the default (fast variance) is off by more than 1 "
                   "at offset 1e4 and the two-pass variance by more than 1e-2 at 1e6, in float32")
def test_accuracy_quick_table_flax_within_1e_4_where_jaxnorm_is(accuracy_quick):
  results, _ = accuracy_quick
  for kind in ("LayerNorm", "LayerNorm rows", "BatchNorm"):
    table = results[kind]
    assert table[("float32", 1e4)]["flax default"] < 1e-4, (kind, table)
    assert table[("float32", 1e6)]["flax two-pass"] < 1e-4, (kind, table)


def test_stats_cost_quick_table():
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  result = subprocess.run([sys.executable, str(BENCHMARKS / "stats_cost.py"), "--quick",
                           "--rounds", "2"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=BENCHMARKS.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "GLIBC_TUNABLES set" in out, out  # the script restarted itself with the tunables
  rows = [line for line in out.splitlines() if re.match(r"\| \d+x\d+", line)]
  assert len(rows) == 8, out  # 2 shapes x (statistics, layer) x (fwd, fwd+bwd)
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    ratios = [float(c) for c in cells[3:9]]
    assert all(math.isfinite(r) and r > 0 for r in ratios), row
