# The README's two commands: `make search` and `make test`. Each sets up .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned here only (the package metadata takes a range so that
# cluster users keep their own CUDA build); these versions lie on local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SPEC ?= search_spaces/digits.yaml

.PHONY: setup search test bench clean

$(BIN)/kdtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $(BIN)/kdtune

setup: $(BIN)/kdtune

search: setup
	$(BIN)/kdtune search $(SPEC)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
