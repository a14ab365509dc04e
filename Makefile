# Two commands for a fresh machine: `make run` (the main job on an embedded local Ray) and `make test`.
# `make test-fast` is the developer's minute: the tests that need no Ray runtime.
PY ?= python3.11
# The slowest tests are listed after every run, so a slow one is noticed.
PYTEST_ARGS ?= --durations=15
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast fuzz lint bench-deps bench-ingest bench-train-gowalla bench-warm-start bench-serve bench-freshness bench-train-scale bench-faults bench-interests bench-catalogue bench-seen-events bench-defaults clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m cluster.main $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not ray" $(PYTEST_ARGS)

# The fuzz tests with random seeds and IG_FUZZ_SCALE (default 10) times their examples; CI runs them derandomized.
fuzz: $(STAMP)
	IG_FUZZ_SCALE=$${IG_FUZZ_SCALE:-10} $(BIN)/python -m pytest tests/datasets/test_fuzz_adapters.py \
		tests/serve_app/test_fuzz_events.py tests/serve_app/test_fuzz_http.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The serving benchmarks drive HTTP load with hey (Debian's package), a compiled client in its own process; the
# training workers run on jemalloc where the machine has it (trainers/allocator.py).
bench-deps:
	(command -v hey >/dev/null && ldconfig -p | grep -q libjemalloc) || (apt-get update -q && apt-get install -y -q hey libjemalloc2)

bench-ingest: $(STAMP)
	$(BIN)/python -m bench.ingest $(ARGS)

bench-train-gowalla: $(STAMP)
	$(BIN)/python -m bench.train_gowalla $(ARGS)

bench-warm-start: $(STAMP)
	$(BIN)/python -m bench.warm_start $(ARGS)

bench-serve: $(STAMP) bench-deps
	$(BIN)/python -m bench.serve $(ARGS)

bench-freshness: $(STAMP) bench-deps
	$(BIN)/python -m bench.freshness $(ARGS)

bench-train-scale: $(STAMP)
	$(BIN)/python -m bench.train_scale $(ARGS)

bench-seen-events: $(STAMP)
	$(BIN)/python -m bench.seen_events $(ARGS)

bench-defaults: $(STAMP)
	$(BIN)/python -m bench.defaults $(ARGS)

clean:
	rm -rf var .pytest_cache

bench-faults: $(STAMP) bench-deps
	$(BIN)/python -m bench.faults $(ARGS)

bench-interests: $(STAMP)
	IG_REAL_DATA=$${IG_REAL_DATA:-../shared/data} $(BIN)/python -m bench.interests $(ARGS)

bench-catalogue: $(STAMP) bench-deps
	$(BIN)/python -m bench.catalogue $(ARGS)
