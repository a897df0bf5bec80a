# jaxeff: `make exp name=<experiment> [preset=smoke|full] [key=value ...]`, `make test`, `make bench name=<bench>`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The second CI leg: newest jax/flax on Python 3.13 (Colab's stack), without the PyTorch reference stack.
# With pyenv: PYTHON313="env PYENV_VERSION=3.13.0 python3.13".
PYTHON313 ?= python3.13
VENV313 := .venv313
export JAX_PLATFORMS ?=
# Every `key=value` given on the command line except name/preset/resume is an experiment override.
OVERRIDES := $(filter-out name=% preset=% resume=% PYTHON=%,$(MAKEOVERRIDES))

.PHONY: install install-ref exp test test-py313 test-device test-fast bench lint notebooks pin-notebooks clean-runs

install: $(VENV)/.installed

# One recipe for both venvs: .venv from $(PYTHON), .venv313 from $(PYTHON313). jax needs Python >= 3.11: a venv
# made by an older interpreter is recreated, and an older interpreter is refused by name.
PY_OK = -c 'import sys; sys.exit(sys.version_info < (3, 11))'
$(VENV)/.installed $(VENV313)/.installed: requirements.txt pyproject.toml
	@if test -x $(@D)/bin/python && ! $(@D)/bin/python $(PY_OK); then \
		echo "$(@D) was made with Python < 3.11: recreating it"; rm -rf $(@D); fi
	@py="$(if $(filter $(VENV313),$(@D)),$(PYTHON313),$(PYTHON))"; test -x $(@D)/bin/python || { \
		$$py $(PY_OK) 2>/dev/null || { echo "jaxeff needs Python >= 3.11, and '$$py' is older or missing:" \
		"pass PYTHON=python3.11 (or newer), e.g. make exp name=hart_1024 PYTHON=python3.11"; exit 2; }; \
		echo "$$py -m venv $(@D)"; $$py -m venv $(@D); }
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip install -q -r requirements.txt
	touch $@

install-ref: $(VENV)/.installed-ref

$(VENV)/.installed-ref: requirements-ref.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-ref.txt
	touch $@

exp: install
	@test -n "$(name)" || { echo "usage: make exp name=<experiment> [preset=smoke|full] [key=value ...]"; \
		$(PY) -c "from jaxeff.experiment import load_all; print('known experiments:', *sorted(load_all()), sep='\n  ')"; exit 2; }
	$(PY) -m jaxeff.run name=$(name) $(if $(preset),preset=$(preset)) $(if $(resume),resume=$(resume)) $(OVERRIDES)

# The CPU suite with the given python. Multi-device tests need their own process (XLA_FLAGS before import).
# pytest-xdist runs TEST_JOBS workers, one test file each at a time (module fixtures compile once); on CI's 2 cores
# that is 1.8x faster than one process. TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 2
XDIST = $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)
define run-suite
JAX_PLATFORMS=cpu $(1) -m pytest tests --ignore=tests/multidevice -q --durations=15 $(XDIST)
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $(1) -m pytest tests/multidevice -q $(XDIST)
endef

# The whole CPU suite on the pinned Python 3.11 stack, parity tests included.
test: install install-ref
	$(call run-suite,$(PY))

# The same suite on Python 3.13 with the newest jax/flax requirements.txt resolves; the PyTorch parity tests
# skip (no torch/transformers/diffusers there). CI (.ci/run) runs both legs.
test-py313:
	@$(PYTHON313) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || { \
		echo "make test-py313: '$(PYTHON313)' is not a Python 3.13 interpreter; install one or pass"; \
		echo "  PYTHON313=/path/to/python3.13 (with pyenv: PYTHON313=\"env PYENV_VERSION=3.13.0 python3.13\")"; exit 2; }
	$(MAKE) $(VENV313)/.installed
	$(call run-suite,$(VENV313)/bin/python)

# On a GPU/TPU machine: the pallas tests on the accelerator, compiled-kernel checks included.
test-device: install
	JAX_PLATFORMS= $(PY) -m pytest tests -k pallas -q -rs

# Only the benchmarks that time the PyTorch reference (transformers / diffusers) next to jaxeff need its stack.
BENCH_REF := dcae llama_decode serving
bench: install $(if $(filter $(name),$(BENCH_REF)),install-ref)
	@test -n "$(name)" || { echo "usage: make bench name=<benchmark>"; ls benchmarks | grep -v __ | sed 's/\.py$$//;s/^/  /'; exit 2; }
	@test -f benchmarks/$(name).py || { echo "unknown benchmark '$(name)'; known benchmarks:"; \
		ls benchmarks | grep -v __ | sed 's/\.py$$//;s/^/  /'; exit 2; }
	$(PY) -m benchmarks.$(name) $(if $(preset),preset=$(preset)) $(OVERRIDES)

lint: install
	$(PY) -m ruff check .

notebooks: install
	JAX_PLATFORMS=cpu JAXEFF_NOTEBOOK_SMOKE=1 $(PY) notebooks/execute.py notebooks/*.ipynb

pin-notebooks:  # after the library changed: the install cells pin the last commit that changed it
	python3 notebooks/pin.py

clean-runs:
	rm -rf runs
