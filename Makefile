# Three commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs jaxnorm with the example extras, runs the demo
#               (report and plots in outputs/demo/)
#   make test   creates .venv, installs jaxnorm with the test extras, runs the whole suite
#   make docs   creates .venv, installs jaxnorm with the docs extra, builds the documentation
#               site into docs/_build/html (warnings are errors; no network needed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch is an optional reference: torch==2.13.0 is a CPU build on the project's machines.
# Tests and benchmarks that compare with it skip with a note where it is absent, except under
# CI=true (.ci/run sets it), where a missing PyTorch fails the run.
TORCH ?= torch==2.13.0

.PHONY: demo test docs bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,examples]'
	-$(PY) -m pip install -q $(TORCH) || echo "PyTorch not installed: its comparisons will be skipped (and fail under CI=true)"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py --out outputs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q

$(VENV)/.docs-installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

# A fresh build each time (-E), so that every warning shows and fails it; the demo's report is
# included where `make demo` has written it (outputs/demo/), a note otherwise.
docs: $(VENV)/.docs-installed
	rm -rf docs/_build/html
	$(PY) -m sphinx -b html -W --keep-going -E -q docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(VENV)/.installed
	$(PY) benchmarks/speed.py --readme
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/stats_cost.py
	$(PY) benchmarks/input_stats.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/fold.py
	$(PY) benchmarks/quantiles.py
	$(PY) benchmarks/accelerator.py  # GPU/TPU only: says so and exits 0 elsewhere

clean:
	rm -rf $(VENV) build *.egg-info
