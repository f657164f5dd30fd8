"""The documentation: every public name has an API page, and every guide's code runs.

Building the whole site takes about 1 to 2 minutes on 2 cores (`make docs`), too slow for the
suite, so this file checks what the build rests on, in a few seconds each:
- the API pages that docs/_ext/jaxnorm_api.py generates from each public module's ``__all__``:
  one per public name, each with the autodoc directive that renders it, and a module page that
  lists it; and that every public function and class has the docstring its page renders;
- the code of every guide (the ``pycon`` blocks of docs/**/*.md, run as one doctest per page
  with NORMALIZE_WHITESPACE and ELLIPSIS), so a guide whose code fails, or prints something else than
  the page shows, fails here.
The docstrings' own ``>>>`` examples run through ``--doctest-modules`` (pyproject.toml). None of
this needs Sphinx, which only the docs extra installs; `make docs` checks the rendering itself
(warnings are errors).
"""
from __future__ import annotations

import doctest
import importlib
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import jaxnorm_api  # noqa: E402  pylint: disable=wrong-import-position

FENCE = re.compile(r"^```pycon[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if "_build" not in p.parts and "_demo" not in p.parts and FENCE.search(p.read_text()))


def test_every_public_name_has_a_generated_page():
  jaxnorm_api.write_pages()
  names = jaxnorm_api.public_names()
  assert len(names) > 100, names
  modules = {module for module, _ in names}
  assert {"jaxnorm", "jaxnorm.linen", "jaxnorm.nnx"} <= modules
  for module_name in ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.beam"):
    try:
      importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if error.name == module_name:
        continue  # jaxnorm.beam before it lands
    module = sys.modules[module_name]
    expected = set(module.__all__)
    assert expected == {name for module, name in names if module == module_name}, module_name
  for module_name, name in names:
    page = jaxnorm_api.page_path(module_name, name)
    assert page.is_file(), f"no API page for {module_name}.{name}"
    text = page.read_text()
    assert re.search(rf"^\.\. auto(class|function|data):: {re.escape(name)}$", text, re.M), text
    assert f".. currentmodule:: {module_name}" in text
    listing = (jaxnorm_api.GENERATED / f"{module_name}.rst").read_text()
    assert f"   {name}\n" in listing and f"   {name} <{module_name}/{name}>\n" in listing
  # The reference's index reaches every module page.
  assert "generated/*" in (DOCS / "api" / "index.md").read_text()
  assert "api/index" in (DOCS / "index.md").read_text()


def test_a_name_missing_from_the_module_is_an_error(monkeypatch):
  import jaxnorm.linen  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jaxnorm.linen, "__all__", (*jaxnorm.linen.__all__, "NotThere"))
  with pytest.raises(ValueError, match="NotThere"):
    jaxnorm_api.write_pages()
  monkeypatch.undo()
  jaxnorm_api.write_pages()


def test_every_public_function_and_class_has_a_docstring():
  """What each API page shows: a name without a docstring would get an empty page."""
  for module_name, name in jaxnorm_api.public_names():
    obj = getattr(sys.modules[module_name], name)
    if callable(obj):
      assert (obj.__doc__ or "").strip(), f"{module_name}.{name} has no docstring for its page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_code_runs(page):
  blocks = FENCE.findall(page.read_text())
  text = "\n".join(block.rstrip() + "\n" for block in blocks)
  test = doctest.DocTestParser().get_doctest(text, {"__name__": "guide"}, page.name,
                                             str(page), 0)
  assert test.examples, page
  runner = doctest.DocTestRunner(optionflags=OPTIONS)
  output = []
  runner.run(test, out=output.append)
  assert runner.failures == 0, "".join(output)


def test_guides_are_in_the_table_of_contents():
  index = (DOCS / "index.md").read_text()
  for page in sorted((DOCS / "guides").glob("*.md")):
    assert f"guides/{page.stem}" in index, f"{page.name} is not in docs/index.md's toctree"
