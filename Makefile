# The one entry point for humans and CI. `make test` and `make serve` install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests need: Fashion-MNIST (the demo model's data and quality reference) and headless
# Chromium with its driver (the playground page test), docker-compose and Prometheus's promtool (the deployment
# file checks: `docker-compose config`, `promtool check config`) and hey (the serving benchmark's independent load
# tool). The server needs none of them.
DEBIAN_PACKAGES := dataset-fashion-mnist chromium chromium-driver docker-compose prometheus hey

.PHONY: install install-serve debian-packages test lint typecheck pytest conformance bench serve weights clean \
	demo-model demo-classifier mixer-classifier evaluate test-fast loadtest soak gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# What serving needs and nothing else (no test tools, no Ray): torch first, from TORCH_INDEX, then the package; its
# torch pin is then already met, so pip keeps that build (as the Dockerfile does). Without an NVIDIA GPU
# (no nvidia-smi) TORCH_INDEX is PyTorch's CPU-only index, since the default one gives the CUDA build on Linux,
# GBs of libraries a CPU never uses; with one it is empty: the default index, the CUDA build.
# `make serve TORCH_INDEX=https://download.pytorch.org/whl/cu128` picks another.
SERVE_STAMP := $(VENV)/.installed-serve
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml)
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)

$(SERVE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps '$(TORCH_PIN)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	touch $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)

# installs only the missing ones (a dpkg query when none is)
debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/ruff format --check app tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) debian-packages
	$(PY) -m pytest -q

test: lint typecheck pytest

# a quick subset while developing: no test marked slow, browser or compile (pyproject.toml lists the markers)
test-fast: $(STAMP) debian-packages
	$(PY) -m pytest -q -m "not slow and not browser and not compile"

conformance: $(STAMP)
	$(PY) -m app conformance tests/data/var_official_tiny
	$(PY) -m app conformance tests/data/var_official_shared_aln

# The default comparison: the d16 shape (random weights), the float32 baseline, our bf16 variant and the compressed
# variants at batch 1 and 8, with the official code beside them when OFFICIAL_SRC names a checkout of it
# (`official-bf16` among them where bfloat16 is native); BENCH_ARGS adds or overrides options.
BENCH_DEFAULTS := --preset d16 --variants baseline,bf16,litevar,fastest --batch-sizes 1,8 --runs 3 \
	--json runs/bench.json $(if $(OFFICIAL_SRC),--official-src $(OFFICIAL_SRC))
bench: $(STAMP)
	$(PY) -m app.bench $(BENCH_DEFAULTS) $(BENCH_ARGS)

# Open-loop load on loopback (docs/reliability.md): starts the server (baseline, litevar), measures its capacity,
# ramps from idle to 4x capacity and back in 2 minutes; writes runs/loadtest.json; fails on any request not
# answered, answered late or with an unexpected 5xx. LOAD_ARGS adds options (`--url http://127.0.0.1:PORT`...).
loadtest: $(STAMP)
	$(PY) -m app.bench load --json runs/loadtest.json $(LOAD_ARGS)

# The same mix at about capacity for 10 minutes; also fails when the server's RSS grows more than 5% (median of
# the last minute against the first minute after a minute of warm-up). Not part of `make test`.
soak: $(STAMP)
	$(PY) -m app.bench load --profile steady --level 1.0 --duration 600 --max-rss-growth 0.05 \
		--json runs/soak.json $(SOAK_ARGS)

# On a machine with an NVIDIA GPU: conformance on the device, a batch's memory, and the d16 batch-8 benchmark of
# baseline (bf16), litevar and fastest, written to runs/gpu-check.json (app/tools/gpu_check.py).
gpu-check: $(STAMP)
	$(PY) -m app gpu-check --json runs/gpu-check.json

# the demo model on 127.0.0.1:8000; VAR_* variables (docs/serving.md) configure the rest
serve: $(SERVE_STAMP)
	$(PY) -m app.serve

# Released weights from the Hugging Face Hub, verified, laid out as model_store/var_$(MODEL) (docs/released-weights.md)
MODEL ?= d16
weights: $(SERVE_STAMP)
	$(PY) -m app weights $(MODEL) $(WEIGHTS_ARGS)

# The first quality judge: a CNN on the Fashion-MNIST train split (a few minutes).
demo-classifier: $(STAMP) debian-packages
	$(PY) -m app.train classifier

# The second, independent judge: an MLP-Mixer, seed 1, on the same split (docs/evaluation.md). One thread: the
# order of its sums, hence its weights, then does not depend on how many cores the machine has.
mixer-classifier: $(STAMP) debian-packages
	$(PY) -m app.train classifier --architecture mixer --threads 1

# The embedded demo model from scratch (resumable; about 1.5 h on 2 cores), then its evaluation and card.
DEMO_EVAL := --images-per-class 200 --variants baseline
demo-model: $(STAMP) debian-packages
	$(PY) -m app.train demo
	$(PY) -m app evaluate --model model_store/demo $(DEMO_EVAL) --json runs/demo/eval.json --out-dir runs/demo/eval
	$(PY) -m app evaluate --model runs/demo/early --label early $(DEMO_EVAL) --json runs/demo/eval_early.json \
		--out-dir runs/demo/eval
	$(PY) -m app.train card

# every variant of EVAL_ARGS judged in both feature spaces (the demo classifier's and the mixer's), with verdicts
evaluate: $(STAMP) debian-packages
	$(PY) -m app evaluate $(EVAL_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
