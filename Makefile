# The two commands a new user runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk, in seconds.
	$(PY) -m pip install -q --disable-pip-version-check "torch>=2.13,<2.14"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/mannstudy demo

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) results .pytest_cache
