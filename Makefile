# The README's commands. `make install` is idempotent: it rebuilds .venv only when pyproject changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-ingest bench-apply bench-train bench-serving model-quality lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null || { echo "installing redis-server (apt-get)"; \
	  (apt-get install -y redis-server >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y redis-server >/dev/null)) \
	  || { echo "redis-server is required: install it (apt-get install redis-server)"; exit 1; }; }
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { echo "installing python3-venv (apt-get)"; \
	  (apt-get install -y python3-venv >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y python3-venv >/dev/null)) \
	  || { echo "python3-venv is required: install it (apt-get install python3-venv)"; exit 1; }; }
	test -x $(BIN)/pip || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/clv demo

bench-ingest: install
	$(BIN)/python -m benchmarks.bench_ingest

bench-apply: install
	$(BIN)/python -m benchmarks.bench_apply $(ARGS)

bench-train: install
	$(BIN)/python -m benchmarks.bench_train

bench-serving: install
	@command -v wrk >/dev/null || { echo "installing wrk (apt-get)"; \
	  (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null)) \
	  || { echo "wrk is required: install it (apt-get install wrk)"; exit 1; }; }
	$(BIN)/python -m benchmarks.bench_serving $(ARGS)

model-quality: install
	$(BIN)/python -m training.quality --out docs/model-quality.md

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy clv service consumers feature_store training

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
