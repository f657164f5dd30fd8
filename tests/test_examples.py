"""Each example in examples/ runs once in its quick mode and shows what it claims."""
import os
import pathlib
import re
import subprocess
import sys

import pytest


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


# XLA's lowest optimization level: a quick run's time goes mostly to compiling, not running
# (as examples/qk_norm_study.py --quick does for itself).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def run_example(name: str, *args: str, timeout: int = 240, fast_compile: bool = False) -> str:
  """Runs ``examples/name`` in a fresh interpreter and returns its standard output.

  ``fast_compile`` compiles at XLA's lowest optimization level (``FAST_COMPILE``): for quick
  runs, whose few steps cost far less than compiling them.
  """
  env = dict(os.environ, MPLBACKEND="Agg")
  if fast_compile:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_quickstart_trains_and_standardizes_far_from_zero():
  out = run_example("quickstart.py", fast_compile=True)
  variances = re.search(r"var\s+= \[([^\]]+)\]", out).group(1).split()
  assert all(0.8 < float(v) < 1.2 for v in variances), out  # std-1 data at 1e4: var near 1
  losses = [float(v) for v in re.findall(r"train loss ([\d.]+)", out)]
  assert losses[-1] < losses[0] / 10, out


@pytest.fixture(scope="module")
def swap_flax_batchnorm():
  """The output of examples/swap_flax_batchnorm.py --quick, run once for the tests below."""
  return run_example("swap_flax_batchnorm.py", "--quick", fast_compile=True)


def far_data_stds(out):
  """The example's BatchNorm output std on data around 1e4: flax's, jaxnorm's."""
  return map(float, re.search(r"flax ([\d.e+-]+), jaxnorm ([\d.e+-]+)", out).groups())


def test_swap_flax_batchnorm_keeps_checkpoint_and_fixes_far_data(swap_flax_batchnorm):
  out = swap_flax_batchnorm
  difference = float(re.search(r"max \|output difference\| ([\d.e+-]+)", out).group(1))
  assert difference < 1e-4, out
  _, jaxnorm_std = far_data_stds(out)
  assert abs(jaxnorm_std - 1) < 0.01, out


@pytest.mark.xfail(strict=False, raises=AssertionError,
                   reason="flax 0.12.8 defect: BatchNorm's fast variance E[x^2] - E[x]^2 cancels "
                   "on data around 1e4: output std about 200 where 1 is right")
def test_swap_flax_batchnorm_flax_std_1_on_far_data(swap_flax_batchnorm):
  flax_std, _ = far_data_stds(swap_flax_batchnorm)
  assert abs(flax_std - 1) < 0.01, swap_flax_batchnorm


def test_sync_batchnorm_shard_map_equals_one_device():
  out = run_example("sync_batchnorm_shard_map.py", "--quick", fast_compile=True)
  differences = [float(v) for v in re.findall(r"running statistics ([\d.e+-]+)", out)]
  assert len(differences) == 2 and max(differences) < 1e-4, out
  assert "running mean finite: True" in out


def test_nnx_quickstart_learns_digits():
  out = run_example("nnx_quickstart.py", "--quick", fast_compile=True)
  accuracy = float(re.search(r"held-out accuracy with running statistics: ([\d.]+)", out).group(1))
  assert accuracy > 0.5, out  # chance is 0.1
