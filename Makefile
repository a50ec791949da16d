# `make demo` runs the main job, `make test` the tests; both set up a fresh machine first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(PY) hub_scripts/run_offline_default.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_sae_step.py
