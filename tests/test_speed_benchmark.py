"""benchmarks/speed.py runs in quick mode and prints its table (no timing is asserted)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import pathlib
import re
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_speed_quick_table():
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--no-torch", "--only",
       "layer_norm,batch_norm,group_norm,standardize"],
      capture_output=True, text=True, timeout=600, cwd=BENCHMARKS.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "left out (--no-torch)" in result.stderr, result.stderr[-3000:]
  rows = [line for line in result.stdout.splitlines() if re.match(r"\| [a-z_]+ \| \d", line)]
  # layer, batch and group norm forward and forward+backward; standardize forward only
  assert [tuple(c.strip() for c in row.strip("|").split("|")[:3]) for row in rows] == [
      ("layer_norm", "256x1024", "fwd"), ("layer_norm", "256x1024", "fwd+bwd"),
      ("batch_norm", "8x8x8x64", "fwd"), ("batch_norm", "8x8x8x64", "fwd+bwd"),
      ("group_norm", "8x8x8x64", "fwd"), ("group_norm", "8x8x8x64", "fwd+bwd"),
      ("standardize", "256x1024", "fwd")], result.stdout
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    jaxnorm_multiple, planned = float(cells[3]), float(cells[8])
    assert math.isfinite(jaxnorm_multiple) and jaxnorm_multiple > 0, row
    assert planned >= 0.9, row  # XLA plans at least the minimum bytes
    if cells[0] != "standardize":
      assert math.isfinite(float(cells[4])), row  # flax's column is filled


def test_speed_baseline_and_reference_tables_side_by_side():
  """--baseline times another checkout's jaxnorm in the same rounds (the same checkout as its
  own baseline plans the same bytes); --reference-paths times the reference path likewise."""
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--no-torch", "--only",
       "layer_norm", "--baseline", str(BENCHMARKS.parent), "--reference-paths"],
      capture_output=True, text=True, timeout=600, cwd=BENCHMARKS.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  baseline, reference = result.stdout.split("in the same rounds:")[1:]
  reference_rows = [line for line in reference.splitlines()
                    if re.match(r"\| layer_norm \| \d", line)]
  assert len(reference_rows) == 2, result.stdout
  for row in reference_rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[6]) > 0, row
  table = baseline
  rows = [line for line in table.splitlines() if re.match(r"\| layer_norm \| \d", line)]
  assert len(rows) == 2, result.stdout
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    before, after, ratio = float(cells[3]), float(cells[4]), float(cells[5])
    assert before > 0 and after > 0 and math.isclose(ratio, after / before, rel_tol=0.02), row
    assert cells[6] == cells[7], row


def test_compiled_programs_of_a_checkout_equal_its_own(monkeypatch):
  """benchmarks/compiled.py fingerprints the compiled programs; a checkout against itself
  gives the same program for every case. Its main runs here (this process's fingerprints), and
  starts the baseline's process itself."""
  monkeypatch.setattr(sys, "path", list(sys.path))  # compiled.py puts benchmarks/ on it
  # ... and imports benchmarks/speed.py as "speed": undone after the test (set, then deleted).
  monkeypatch.setitem(sys.modules, "speed", None)
  monkeypatch.delitem(sys.modules, "speed")
  spec = importlib.util.spec_from_file_location("benchmarks_compiled", BENCHMARKS / "compiled.py")
  compiled = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compiled)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ours = compiled.main(["--quick", "--only", "layer_norm,batch_norm",
                          "--baseline", str(BENCHMARKS.parent)])
  stdout = out.getvalue()
  assert len(ours) == 4, ours
  rows = [line for line in stdout.splitlines() if re.match(r"\| [a-z_]+ \d", line)]
  assert len(rows) == 4 and all(row.rstrip(" |").endswith("yes") for row in rows), stdout
  assert "4 of 4 programs are the same" in stdout
