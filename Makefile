# The two commands a new user runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean postgres

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk, in seconds.
	$(PY) -m pip install -q --disable-pip-version-check "torch>=2.13,<2.14"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# PostgreSQL's server binaries for tests/test_cluster.py (Debian's package; as root where apt-get exists,
# otherwise those tests skip and say why).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	      postgresql >/dev/null; } || echo "make: no PostgreSQL server binaries; tests/test_cluster.py will skip"

test: $(STAMP) lint postgres
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/mannstudy demo

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) results .pytest_cache
