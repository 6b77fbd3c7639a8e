# Set-up and checks. Each target creates .venv when it is missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed-cli: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[cli,models,tiles,onnx,slides]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-cli

demo: $(VENV)/.installed-cli
	$(BIN)/fcconv demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/conv_matrix.py
	$(BIN)/python bench/dense_vs_sliding.py
	$(BIN)/python bench/tiled.py
	$(BIN)/python bench/onnx.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
