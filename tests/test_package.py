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
