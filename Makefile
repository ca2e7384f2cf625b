# The README's two commands: `make run` (set up, then generate with the shipped model) and
# `make test` (set up with the test extras, then run the whole suite). Everything a fresh
# machine needs is installed here, into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
BUILD_DEPS := "scikit-build-core>=0.10" "nanobind>=2.0"

.PHONY: run test install install-test lint shipped-model clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)
	touch $@

# Editable install whose native extension rebuilds on import when a C++ source changes.
install: $(VENV)/.created
	$(PIP) install -q --no-build-isolation -e .

install-test: $(VENV)/.created
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-build-isolation -e ".[test]"

run: install
	$(VENV)/bin/bitnet158 generate "ROMEO:" --max-new-tokens 120 --seed 0

test: install-test
	$(PY) -m pytest -q tests

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks scripts

# Retrain the shipped model from scratch (documented in the README; ~40 min on 2 cores).
shipped-model: install-test
	$(PY) scripts/train_shipped_model.py

clean:
	rm -rf $(VENV) build
