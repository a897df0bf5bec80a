# jaxeff: `make exp name=<experiment> [preset=smoke|full] [key=value ...]`, `make test`, `make bench name=<bench>`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?=
# Every `key=value` given on the command line except name/preset/resume is an experiment override.
OVERRIDES := $(filter-out name=% preset=% resume=% PYTHON=%,$(MAKEOVERRIDES))

.PHONY: install install-ref exp test test-device test-fast bench lint notebooks clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install-ref: $(VENV)/.installed-ref

$(VENV)/.installed-ref: requirements-ref.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-ref.txt
	touch $@

exp: install
	@test -n "$(name)" || { echo "usage: make exp name=<experiment> [preset=smoke|full] [key=value ...]"; \
		$(PY) -c "from jaxeff.experiment import load_all; print('known experiments:', *sorted(load_all()), sep='\n  ')"; exit 2; }
	$(PY) -m jaxeff.run name=$(name) $(if $(preset),preset=$(preset)) $(if $(resume),resume=$(resume)) $(OVERRIDES)

# The whole CPU suite, parity tests included. Multi-device tests need their own process (XLA_FLAGS before import).
test: install install-ref
	JAX_PLATFORMS=cpu $(PY) -m pytest tests --ignore=tests/multidevice -q --durations=15
	JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest tests/multidevice -q

# On a GPU/TPU machine: the pallas tests on the accelerator, compiled-kernel checks included.
test-device: install
	JAX_PLATFORMS= $(PY) -m pytest tests -k pallas -q -rs

bench: install install-ref
	@test -n "$(name)" || { echo "usage: make bench name=<benchmark>"; ls benchmarks | grep -v __ | sed 's/\.py$$//;s/^/  /'; exit 2; }
	@test -f benchmarks/$(name).py || { echo "unknown benchmark '$(name)'; known benchmarks:"; \
		ls benchmarks | grep -v __ | sed 's/\.py$$//;s/^/  /'; exit 2; }
	$(PY) -m benchmarks.$(name) $(OVERRIDES)

lint: install
	$(PY) -m ruff check .

notebooks: install
	JAX_PLATFORMS=cpu JAXEFF_NOTEBOOK_SMOKE=1 $(PY) notebooks/execute.py notebooks/*.ipynb

clean-runs:
	rm -rf runs
