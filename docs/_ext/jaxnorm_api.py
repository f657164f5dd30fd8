"""The API reference, generated from the public modules' ``__all__`` at every build.

Nothing here lists a name by hand: a name added to ``__all__`` of ``jaxnorm``,
``jaxnorm.linen``, ``jaxnorm.nnx`` (or ``jaxnorm.beam``, where that module exists) gets its own
page at the next build, and ``tests/test_docs.py`` fails if one has none. The pages are written to
``docs/api/generated/`` (not versioned): one page per module with a summary table, one page per
public name with its docstring.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import pathlib
import shutil
from collections.abc import Iterator
from types import ModuleType

#: The public modules, in the order of the reference. Those that do not exist are skipped.
PUBLIC_MODULES = ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.beam")

#: Optional third-party packages a public module may import; mocked while documenting where they
#: are not installed, so that the docs need none of them.
OPTIONAL_IMPORTS = ("apache_beam",)

API_DIR = pathlib.Path(__file__).resolve().parent.parent / "api"
GENERATED = API_DIR / "generated"


def _missing_optional_imports() -> list[str]:
  return [name for name in OPTIONAL_IMPORTS if importlib.util.find_spec(name) is None]


def public_modules() -> Iterator[ModuleType]:
  """The public modules that exist, imported (optional dependencies mocked where absent)."""
  missing = _missing_optional_imports()
  if missing:  # only the docs build lacks them; the test environment has them all
    from sphinx.ext.autodoc.mock import mock  # pylint: disable=import-outside-toplevel
  else:
    mock = lambda names: contextlib.nullcontext()  # noqa: E731
  for module_name in PUBLIC_MODULES:
    try:
      exists = importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
      exists = False
    if not exists:
      continue
    with mock(missing):
      module = importlib.import_module(module_name)
    if not hasattr(module, "__all__"):
      raise ValueError(f"{module_name} has no __all__; the API reference is generated from it, "
                       f"so list its public names there")
    yield module


def public_names() -> list[tuple[str, str]]:
  """``(module, name)`` for every public name of every public module, in ``__all__`` order."""
  return [(module.__name__, name) for module in public_modules() for name in module.__all__]


def page_path(module_name: str, name: str) -> pathlib.Path:
  """Where the page of ``module_name.name`` is written."""
  return GENERATED / module_name / f"{name}.rst"


def _directive(obj) -> tuple[str, list[str]]:
  """The autodoc directive and options that document ``obj``."""
  if inspect.isclass(obj):
    options = [":members:", ":show-inheritance:"]
    if "__call__" in vars(obj) and getattr(obj.__call__, "__doc__", None):
      options.append(":special-members: __call__")
    return "autoclass", options
  if callable(obj):
    return "autofunction", []
  return "autodata", [":annotation:"]


def _heading(text: str, underline: str, overline: bool = False) -> str:
  line = underline * len(text)
  return f"{line}\n{text}\n{line}\n" if overline else f"{text}\n{line}\n"


def _name_page(module_name: str, name: str, obj) -> str:
  directive, options = _directive(obj)
  lines = [f".. currentmodule:: {module_name}", "", _heading(f"{module_name}.{name}", "="),
           f".. {directive}:: {name}"]
  lines += [f"   {option}" for option in options]
  return "\n".join(lines) + "\n"


def _module_page(module: ModuleType) -> str:
  doc = inspect.getdoc(module) or ""
  summary = doc.splitlines()[0] if doc else ""
  names = list(module.__all__)
  lines = [_heading(module.__name__, "="), f".. module:: {module.__name__}", "", summary, "",
           f"{len(names)} public names, each on its own page.", "",
           f".. currentmodule:: {module.__name__}", "", ".. autosummary::", ""]
  lines += [f"   {name}" for name in names]
  lines += ["", ".. toctree::", "   :hidden:", ""]
  lines += [f"   {name} <{module.__name__}/{name}>" for name in names]
  return "\n".join(lines) + "\n"


def write_pages() -> list[pathlib.Path]:
  """Writes every module page and name page afresh; returns the pages written."""
  if GENERATED.exists():
    shutil.rmtree(GENERATED)
  written = []
  for module in public_modules():
    (GENERATED / module.__name__).mkdir(parents=True, exist_ok=True)
    page = GENERATED / f"{module.__name__}.rst"
    page.write_text(_module_page(module))
    written.append(page)
    for name in module.__all__:
      if not hasattr(module, name):
        raise ValueError(f"{module.__name__}.__all__ lists {name!r}, which the module does not "
                         f"define; import it there or remove it from __all__")
      page = page_path(module.__name__, name)
      page.write_text(_name_page(module.__name__, name, getattr(module, name)))
      written.append(page)
  return written


def _on_builder_inited(app) -> None:
  del app
  write_pages()


def setup(app):
  app.connect("builder-inited", _on_builder_inited)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
