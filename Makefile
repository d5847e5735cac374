# The one entry point for humans and CI. `make test` and `make serve` install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest conformance bench serve clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/ruff format --check app tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck pytest

conformance: $(STAMP)
	$(PY) -m app.conformance tests/data/var_official_tiny
	$(PY) -m app.conformance tests/data/var_official_shared_aln

bench: $(STAMP)
	$(PY) -m app.bench $(BENCH_ARGS)

serve:
	@echo "make serve arrives with the serving issue (POST /generate); use 'python -m app generate' meanwhile." >&2
	@exit 1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
