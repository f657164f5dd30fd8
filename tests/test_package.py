"""The package itself: its dependencies, and what it exports."""
import ast
import pathlib
import tomllib

import jaxnorm
import jaxnorm.linen
import jaxnorm.nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_library_does_not_import_optax():
  """optax is for the examples and tests (extras); flax.nnx brings it, jaxnorm does not need it."""
  importers = []
  for path in (ROOT / "jaxnorm").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(name.split(".")[0] == "optax" for name in names):
        importers.append(str(path.relative_to(ROOT)))
  assert not importers
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert not [d for d in project["dependencies"] if d.startswith("optax")]
  assert any(d.startswith("optax") for d in project["optional-dependencies"]["examples"])


def test_every_exported_name_exists():
  for module in (jaxnorm, jaxnorm.linen, jaxnorm.nnx):
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, (module.__name__, missing)


def test_core_dependencies_are_jax_flax_and_numpy_only():
  """Everything else is an extra, imported where it is used: a core install imports jaxnorm."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
  assert names <= {"jax", "jaxlib", "flax", "numpy"}, names
  top_level = []
  for path in (ROOT / "jaxnorm").rglob("*.py"):
    for node in ast.parse(path.read_text()).body:  # module-level imports only
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(name.split(".")[0] in ("datasketches", "apache_beam") for name in names):
        top_level.append(str(path.relative_to(ROOT)))
  assert set(top_level) <= {"jaxnorm/_src/beam_stats.py"}, top_level  # behind `import jaxnorm.beam`


def test_without_datasketches_moments_work_and_quantiles_name_the_extra():
  import subprocess
  import sys
  code = """
import sys
sys.modules["datasketches"] = None  # as if the quantiles extra were not installed
import numpy as np, jaxnorm
x = np.random.default_rng(0).normal(size=(100, 3))
print(abs(float(jaxnorm.fit_stats([x], quantiles=False).mean[0]) - x[:, 0].mean()) < 1e-12)
print(float(jaxnorm.fit_stats([x.astype(np.uint8)]).median[0]) >= 0)  # exact counts: no sketch
try:
  jaxnorm.fit_stats([x])
except ImportError as error:
  print(error)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[:2] == ["True", "True"], out.stdout
  assert "pip install 'jaxnorm[quantiles]'" in out.stdout and "quantiles=False" in out.stdout
