# Set-up and everyday commands. `make test` and `make demo` build .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-full-demo lint demo clean-venv

DEMO_OUT ?= runs/demo
DEMO_ARGS ?=

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,web,serve,deepspeed]"
	# Gradio 6 caps Pillow below 13; the image processor gives the reference's pixels under 12 and 13 alike.
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The whole seed-0 demo, the recipe's and --profile grounded_large's, asserted as tests/test_demo_full.py says (not in
# `make test`: the recipe ~15 minutes with avx512_bf16, the profile 31-45 on a 2-core AVX2-only EPYC; docs/LOG.md).
test-full-demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --full-demo tests/test_demo_full.py $(PYTEST_ARGS)

# The toy-world demo: a tiny model trained from scratch, evaluated, preference-aligned; see runs/demo/REPORT.md.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/mllm demo --out $(DEMO_OUT) $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mllm tests benchmarks
	$(BIN)/ruff format --check mllm tests benchmarks

clean-venv:
	rm -rf $(VENV)
