# Two entry points, each doing its own set-up from a fresh clone:
#   make demo   creates .venv, installs the package with the apps extra, runs `memwatch demo`
#   make test   creates .venv, installs with the dev extra, runs ruff, the tests and the strict docs build
#
# TORCH_SPEC pins the torch/torchvision pair installed *before* the package. The default is the pair that
# lies on the project machines' disk (CPU-capable CUDA builds that import together with torch-fidelity).
# Elsewhere: `make test TORCH_SPEC=` keeps whatever pip resolves (e.g. your CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-torch: | $(BIN)/python
	$(if $(strip $(TORCH_SPEC)),$(PIP) install $(TORCH_SPEC),true)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install -e '.[dev]'
	touch $@

# the demo needs the [apps] extra only (in a venv set up by `make test` it is already there: dev includes it)
$(VENV)/.installed-apps: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install -e '.[apps]'
	touch $@

demo: $(VENV)/.installed-apps
	$(BIN)/memwatch demo $(DEMO_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check lightning_memwatch tests benchmarks recipes docs

docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

# The suite runs in random order (pytest-randomly, dev extra), a file at a time on every core (pytest-xdist:
# 5 min instead of 9 on 2 cores); the last line prints the seed and the options that rerun that order.
test: lint $(VENV)/.installed
	$(BIN)/python -m pytest -q -p randomly -n auto --dist loadfile
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/knn.py
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) site runs .pytest_cache
