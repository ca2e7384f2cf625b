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

.PHONY: run test install install-test install-browser install-bench bench lint shipped-model fuzz clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)
	touch $@

# Editable install whose native extension rebuilds on import when a C++ source changes.
install: $(VENV)/.created
	$(PIP) install -q --no-build-isolation -e .

# llama-cpp-python compiles the llama.cpp it bundles (tests/formats/test_gguf_llama_cpp.py runs
# our GGUF files in it): CPU backend only, portable ISA, no tools, tests, server or multimodal
# library. About 6 CPU-minutes (3 on an idle 2-core machine); pip caches the built wheel.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF

install-test: $(VENV)/.created install-browser
	$(PIP) install -q $(TORCH)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q "$(LLAMA_CPP)"
	$(PIP) install -q --no-build-isolation -e ".[test]"

# Chromium and its WebDriver for the chat page's browser test (tests/serve/test_chat_page.py),
# from Debian's packages, only when missing; as root or through sudo, without prompts. Where
# there is no apt-get, that test is skipped.
install-browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver; \
	else echo "install-browser: no apt-get; install chromium and chromedriver by hand"; \
	fi

# The benchmark's peers. llama.cpp is built for this CPU (GGML_NATIVE=ON: AVX-512 where there is
# some), into its own folder so the portable build of the tests stays as it is. --no-cache-dir:
# pip's wheel cache does not key on CMAKE_ARGS, so it handed back the tests' portable (AVX2) build.
BENCH_LLAMA_CPP := $(VENV)/bench-llama-cpp
install-bench: install-test $(BENCH_LLAMA_CPP)/.built
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"

$(BENCH_LLAMA_CPP)/.built: | install-test
	CMAKE_ARGS="$(subst -DGGML_NATIVE=OFF,-DGGML_NATIVE=ON,$(LLAMA_CPP_CMAKE_ARGS))" \
		$(PIP) install -q --no-cache-dir --no-deps --no-build-isolation --upgrade \
		--target $(BENCH_LLAMA_CPP) "$(LLAMA_CPP)"
	touch $@

# Not a test: bitnet158 against llama.cpp and transformers, same run, same threads (~20 min).
bench: install-bench
	PYTHONPATH=$(BENCH_LLAMA_CPP) $(VENV)/bin/bitnet158 bench --json bench.json

run: install
	$(VENV)/bin/bitnet158 generate "ROMEO:" --max-new-tokens 120 --seed 0

test: install-test
	$(PY) -m pytest -q tests

# The native extension under AddressSanitizer + UBSan + LeakSanitizer (a few minutes; `make test`
# runs a shorter check): tests/native/test_sanitizers.py builds it into build/asan and runs the
# kernel, forward-pass and generation suites in one process with it in place of the installed one.
ASAN_SUITES := tests/native/test_kernels.py tests/engine/test_native_step.py \
	tests/engine/test_engine_model.py tests/engine/test_edge_cases.py tests/engine/test_generate.py
.PHONY: test-asan soak
test-asan: install-test
	$(PY) -m pytest -q tests/native/test_sanitizers.py
	$(PY) tests/native/test_sanitizers.py -q $(ASAN_SUITES)

# The server soak (RELIABILITY.md): 2,000 mixed, dropped and malformed requests from 32 clients
# against `bitnet158 serve`; `make test` runs 300 from 16 (tests/serve/test_soak.py).
soak: install-test
	$(PY) scripts/soak_serve.py --requests 2000 --clients 32 --json build/soak.json

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks scripts

# Not a test: every fuzz target (tests/fuzz: GGUF reader, our file, Hugging Face checkpoints,
# the server's requests) for FUZZ_SECONDS each, coverage-guided by atheris (libFuzzer). The
# corpora grow in build/fuzz/corpus (kept between runs); a crashing input is written to
# build/fuzz/crashes and stops the run (log: build/fuzz/<target>.log). `make test` runs a
# short smoke of the same targets (tests/fuzz/test_fuzz_smoke.py).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= gguf native hf serve
FUZZ_DIR := build/fuzz
fuzz: install-test
	$(PY) tests/fuzz/fuzz_corpus.py $(FUZZ_DIR)/seeds $(FUZZ_TARGETS)
	@mkdir -p $(FUZZ_DIR)/crashes
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_DIR)/corpus/$$t; rm -rf $(FUZZ_DIR)/tmp; mkdir -p $(FUZZ_DIR)/tmp; \
		echo "fuzz $$t: $(FUZZ_SECONDS) s"; \
		TMPDIR=$(FUZZ_DIR)/tmp $(PY) tests/fuzz/run_fuzz.py $$t $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t \
			-max_total_time=$(FUZZ_SECONDS) -timeout=60 -rss_limit_mb=8192 -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_DIR)/crashes/$$t- > $(FUZZ_DIR)/$$t.log 2>&1; \
		status=$$?; grep -E "^(Done|stat::number_of_executed_units)" $(FUZZ_DIR)/$$t.log; \
		if [ $$status -ne 0 ]; then tail -n 60 $(FUZZ_DIR)/$$t.log; exit 1; fi; \
	done

# Retrain the shipped model from scratch (documented in the README; ~40 min on 2 cores).
shipped-model: install-test
	$(PY) scripts/train_shipped_model.py

clean:
	rm -rf $(VENV) build
