# The two README commands: `make repro` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup repro restore test test-all lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so no resolver step can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,modelopt,ort,ct]'
	touch $@

# Params and the paths they name are checked first: DVC removes a stage's outputs before it
# finds a missing dep.
repro: setup
	$(BIN)/python scripts/check_params.py params.yaml
	$(BIN)/dvc repro

# Back to the last committed run after a failed `dvc repro`: dvc.lock and the git-tracked
# metrics from HEAD, the cached outputs from DVC's cache.
restore:
	git checkout HEAD -- dvc.lock reports
	$(BIN)/dvc checkout

# Two workers (CI and the reference machine have 2 cores); tests that share an expensive
# fixture are kept on one worker (tests/conftest.py), so each INC pass still runs once.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadgroup

test: setup
	$(PYTEST)

test-all: setup
	$(PYTEST) -m ''

lint: setup
	$(BIN)/ruff check src stages tests scripts benchmarks
	$(BIN)/ruff format --check src stages tests scripts benchmarks

clean:
	rm -rf $(VENV)
