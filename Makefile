# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs jaxnorm with the example extras, runs the demo
#               (report and plots in outputs/demo/)
#   make test   creates .venv, installs jaxnorm with the test extras, runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch is an optional reference: torch==2.13.0 is a CPU build on the project's machines.
# Tests and benchmarks that compare with it skip with a note where it is absent, except under
# CI=true (.ci/run sets it), where a missing PyTorch fails the run.
TORCH ?= torch==2.13.0

.PHONY: demo test bench clean

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

bench: $(VENV)/.installed
	$(PY) benchmarks/speed.py --readme
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/stats_cost.py
	$(PY) benchmarks/input_stats.py
	$(PY) benchmarks/scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
