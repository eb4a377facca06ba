# `make run` and `make test` set themselves up: a .venv with the project installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

CONFIG    ?= configs/thumbnails.yaml
BACKEND   ?=
WORKERS   ?=
SCHEDULER ?=
ARGS      ?=
PYTEST_ARGS ?=

# `make cluster`: a real dask scheduler + workers on 127.0.0.1; pids and logs in CLUSTER_DIR.
CLUSTER_DIR     ?= .cluster
CLUSTER_WORKERS ?= 2
CLUSTER_THREADS ?= 1
CLUSTER_PORT    ?= 8786

RUN_FLAGS := $(if $(BACKEND),--backend $(BACKEND)) $(if $(WORKERS),--workers $(WORKERS)) \
             $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(ARGS)

.PHONY: setup run test lint format clean cluster cluster-down bench bench-scale bench-shards

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline run $(CONFIG) $(RUN_FLAGS)

cluster: $(STAMP)
	$(BIN)/python -m pipeline.testing.cluster up --dir $(CLUSTER_DIR) --port $(CLUSTER_PORT) \
		--workers $(CLUSTER_WORKERS) --threads $(CLUSTER_THREADS)

cluster-down: $(STAMP)
	$(BIN)/python -m pipeline.testing.cluster down --dir $(CLUSTER_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests configs bench
	$(BIN)/ruff format --check pipeline tests configs bench

format: $(STAMP)
	$(BIN)/ruff format pipeline tests configs bench
	$(BIN)/ruff check --fix pipeline tests configs bench

clean:
	rm -rf out .pytest_cache .ruff_cache

# The side-by-side benchmark (a script, not a test): COUNT images, table + bench/results/.
# The img2dataset row installs img2dataset 1.47 once into ~/.cache/pipeline-bench (skipped,
# saying why, if it cannot); issue 16's setup (6,000 URLs): make bench BENCH_ARGS="--repeat 3"
COUNT ?= 2000
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.run --count $(COUNT) $(BENCH_ARGS)

# Long inputs: 100,000 items vs 2,000 (rate, client RSS) and a 1,000,000-line list's start-up.
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale --count $(COUNT) $(BENCH_ARGS)

# What big shards cost against per-partition shards (a script, not a test): table + bench/results/shards.json.
bench-shards: $(STAMP)
	$(BIN)/python -m bench.shards --count $(COUNT) $(BENCH_ARGS)
