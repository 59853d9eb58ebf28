# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv with the pinned versions in requirements/*.lock on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The compilation cache outlives checkouts (a fresh clone's suite reuses what earlier runs compiled).
export JAX_COMPILATION_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/proxykd_jax/jax

.PHONY: demo test bench clean-venv

$(VENV)/.base: requirements/base.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/base.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.base requirements/test.lock
	$(BIN)/python -m pip install -q -r requirements/test.lock
	touch $@

demo: $(VENV)/.base
	$(BIN)/python -m proxykd_jax demo --config=configs/demo.py

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

bench: $(VENV)/.test
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
