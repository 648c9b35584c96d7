# Two commands for users: `make demo` and `make test`; `make bench` measures performance. Each creates .venv and
# installs the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Subprocess launches in tests and the demo use one thread per process: on a 2-core machine two
# OpenMP threads per process oversubscribe the cores and run many times slower.
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test check lint format typecheck unit bench bench-full bench-quality gpu-check soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Fast inner loop: lint, format, types and the unit tests (no process launches).
check: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not distributed and not slow"

# Everything: the fast checks first, then the multi-process and slow suites in TEST_WORKERS pytest workers,
# one test module per worker at a time, so that a module's launched runs (module fixtures) are launched once;
# the runs every module shares are launched once per session (tests/conftest.py). TEST_WORKERS=0: no workers.
TEST_WORKERS ?= 2
test: check
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "(distributed or slow) and not soak" --durations=15

# Random power cuts (SOAK_CUTS, default 20; SOAK_SEED) at every fault point until the run completes.
soak: $(STAMP)
	$(BIN)/pytest -q -s -m soak

# Performance as side-by-side ratios (trainer vs hand-written loop, the checkpoint engine vs its peers, ...):
# prints a table with targets and PASS/FAIL, exits 1 if a figure misses its target (benchmarks/perf.py;
# benchmarks/gpu.md for GPUs). `make bench`: the headline figures, 16-23 min on 2 CPU cores, writes
# benchmarks/results-headline.md; `make bench-full`: every figure at every size (the peers at 244M, the scale
# figures, the curves), ~83 min, writes benchmarks/results.md. ARGS go to perf.py, e.g.
# `make bench ARGS="--only stall,write"` for some figures (and the runs they need).
bench: $(STAMP)
	$(BIN)/python benchmarks/perf.py $(ARGS)

bench-full: $(STAMP)
	$(BIN)/python benchmarks/perf.py --full $(ARGS)

# The promises on one GPU in one table (bf16 ZeRO-2 images/s and MFU, training blocked per background save,
# kill -9 then --resume bit-identical, LoRA on the trained base, bf16 export), sized for < 8 min on an H100;
# exits 1 if one fails. ARGS go to scripts/gpu_check.py: `--peak-tflops N` for a GPU it does not know,
# `--cpu` for its dry run at toy sizes on 2 CPU processes (2-4 min, what CI runs: tests/test_gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(ARGS)

# Sample quality of the demo model, judged by an independent digit classifier (~7 min on 2 CPU cores).
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/sample_quality.py

clean:
	rm -rf checkpoints demo_output .pytest_cache .mypy_cache .ruff_cache
