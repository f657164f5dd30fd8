"""Sphinx configuration of jaxnorm's documentation: `make docs` builds it into docs/_build/html.

Everything the build needs is local: no intersphinx, and MathJax is served from the
``django-static-mathjax`` package (MathJax 3, the ``docs`` extra), copied into ``_static``, so the
formulas render without a network.
"""
import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))

import jaxnorm  # noqa: E402  pylint: disable=wrong-import-position

project = "jaxnorm"
author = "the jaxnorm authors"
copyright = "the jaxnorm authors"  # pylint: disable=redefined-builtin
release = version = jaxnorm.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "jaxnorm_api",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# _demo/ holds the demo's report (copied from outputs/demo/ by this file); the demo page
# includes it, so it is not a page of its own.
exclude_patterns = ["_build", "_demo", "Thumbs.db", ".DS_Store"]

# Docstrings: Google style (Args/Returns/Raises), `.. math::` rendered, `>>>` examples shown as
# doctest blocks (the test suite runs them with --doctest-modules).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: the members are documented once, by autodoc
# An "Attributes:" entry links its name; where the class does not document that field itself,
# the name can match fields of several classes ("more than one target found"), which is harmless.
suppress_warnings = ["ref.python"]
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Keep the type aliases of the signatures by name (jaxnorm's modules use postponed annotations):
# ArrayLike would otherwise unfold into a union of eight types in every signature.
autodoc_type_aliases = {name: name for name in (
    "ArrayLike", "Array", "Axes", "AxisName", "Groups", "FloatOrSchedule", "DTypeLike", "Path")}
autodoc_mock_imports = []  # optional dependencies are mocked by jaxnorm_api where absent
autosummary_generate = False  # jaxnorm_api writes the pages from __all__
python_use_unqualified_type_names = True
highlight_language = "text"  # unlabelled blocks (the demo report's tables) stay plain
maximum_signature_line_length = 88

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# No network at build time: nothing from intersphinx, MathJax from the local package.
intersphinx_mapping = {}


def _mathjax_file() -> pathlib.Path:
  try:
    import mathjax  # pylint: disable=import-outside-toplevel  (django-static-mathjax)
  except ImportError as error:
    raise RuntimeError("MathJax is missing: install the docs extra "
                       "(pip install -c constraints.txt -e '.[docs]', or run `make docs`)"
                       ) from error
  return pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg-full.js"


mathjax_path = "mathjax/tex-svg-full.js"  # relative to _static: served locally
mathjax3_config = {"svg": {"fontCache": "global"}}

html_theme = "sphinx_book_theme"
html_title = f"jaxnorm {version}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
html_copy_source = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]
templates_path = []

# The demo's report: outputs/demo/report.md and its plots when `make demo` has run, else a note.
DEMO_OUTPUT = pathlib.Path(os.environ.get("JAXNORM_DEMO_OUTPUT", ROOT / "outputs" / "demo"))
DEMO_COPY = DOCS / "_demo"
DEMO_MISSING = """\
The demo has not been run in this checkout, so its report is not part of this build. Run
`make demo` (about 5 minutes on 2 cores), then `make docs` again: this page then shows
`outputs/demo/report.md` and its plots.
"""


def _copy_demo_report() -> None:
  if DEMO_COPY.exists():
    shutil.rmtree(DEMO_COPY)
  DEMO_COPY.mkdir()
  report = DEMO_OUTPUT / "report.md"
  if not report.is_file():
    (DEMO_COPY / "report.md").write_text(DEMO_MISSING)
    return
  text = report.read_text()
  # The report's headings go under the page's "The report of this checkout": two levels down.
  lines, in_code = [], False
  for line in text.splitlines():
    in_code ^= line.startswith("```")
    lines.append("##" + line if line.startswith("#") and not in_code else line)
  (DEMO_COPY / "report.md").write_text("\n".join(lines) + "\n")
  for plot in DEMO_OUTPUT.glob("*.png"):
    shutil.copy2(plot, DEMO_COPY / plot.name)


def _copy_mathjax(app, exception) -> None:
  if exception is None and app.builder.format == "html":
    target = pathlib.Path(app.outdir) / "_static" / "mathjax"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_mathjax_file(), target / "tex-svg-full.js")


def _skip_foreign_members(app, what, name, obj, skip, options):
  """Documents a class's own methods and properties, not the objects its fields hold.

  A Linen field such as ``attention = nn.dot_product_attention`` or ``param_dtype = jnp.float32``
  would otherwise be documented as a member, with flax's or NumPy's docstring.
  """
  del app, name, options
  if what != "class" or skip:
    return None
  if callable(obj) or isinstance(obj, type):
    qualname = getattr(obj, "__qualname__", "")
    module = getattr(obj, "__module__", "") or ""
    if isinstance(obj, type) or "." not in qualname or not module.startswith("jaxnorm"):
      return True
  return None


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """Shows a type alias inside a union by its name (Sphinx 9 prints its repr there)."""
  del app, what, name, obj, options
  unwrap = lambda text: text and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", text)
  return unwrap(signature), unwrap(return_annotation)


def setup(app):
  app.connect("autodoc-skip-member", _skip_foreign_members)
  app.connect("autodoc-process-signature", _alias_names)
  _mathjax_file()  # fail early, with the fix, if MathJax is not installed
  _copy_demo_report()
  app.connect("build-finished", _copy_mathjax)
