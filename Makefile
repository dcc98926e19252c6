# Two commands do everything on a fresh machine: `make test` and `make demo`.
# `make setup` is their shared, idempotent first step.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU suite is mostly single-threaded (Pallas interpreters), so one pytest worker per core
# (pytest-xdist) cuts it on a 2-core machine to 35-40 minutes from ~55.
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?=

.PHONY: setup test demo demo-attention lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/find_python.sh
	@test -x $(PY) || { base=$$(scripts/find_python.sh) || exit 1; echo "creating $(VENV) with $$base"; $$base -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,data]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The main job: tiny short->long experiment on this CPU (fetches the Debian text packages once).
demo: setup
	$(PY) experiments/short_to_long.py --preset tiny

# InfLLM-V2 attention alone on random inputs: selection statistics and exactness vs dense.
demo-attention: setup
	$(PY) experiments/demo_attention.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
