# The two commands: `make run` serves the local stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The Cloud Tasks emulator pins an old protobuf, so it lives in a virtual environment of its own.
TASKS_EMULATOR_VENV ?= .venv-tasks-emulator
TASKS_EMULATOR_REQUIREMENTS := tests/emulators/requirements-tasks-emulator.txt
# checkov (the Terraform checks of tests/test_terraform.py) pins its own jsonschema, packaging, PyYAML...:
# a virtual environment of its own, like the Tasks emulator's.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_REQUIREMENTS := infra/requirements-checkov.txt
export PYTHONPATH := $(CURDIR)

.PHONY: help install emulators checkov bundle run test bench models clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /\1\t/' | expand -t 12

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TASKS_EMULATOR_VENV)/.installed: $(TASKS_EMULATOR_REQUIREMENTS)
	$(PYTHON) -m venv $(TASKS_EMULATOR_VENV)
	$(TASKS_EMULATOR_VENV)/bin/python -m pip install --quiet -r $(TASKS_EMULATOR_REQUIREMENTS)
	touch $@

$(CHECKOV_VENV)/.installed: $(CHECKOV_REQUIREMENTS)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r $(CHECKOV_REQUIREMENTS)
	touch $@

install: $(VENV)/.installed  ## the project's virtual environment from requirements.txt

emulators: $(TASKS_EMULATOR_VENV)/.installed  ## the Cloud Tasks emulator's own virtual environment

checkov: $(CHECKOV_VENV)/.installed  ## checkov's own virtual environment (Terraform checks)

# The deploy bundle (build/bundle.zip) that infra/terraform uploads and builds every function from.
bundle: install  ## build/bundle.zip, the deploy bundle every function is built from
	$(PY) scripts/build_bundle.py

models: install  ## train the demo models into models/artifacts if absent
	$(PY) scripts/train.py --if-absent

run: install  ## serve the whole local stack on the embedded default (127.0.0.1, port from PORT)
	$(PY) scripts/run_local.py

test: install emulators checkov  ## every test (unit, HTTP, emulators, static checks)
	$(PY) -m pytest -q

bench: install emulators  ## every benchmark, each printing its ratios side by side
	$(PY) scripts/bench_inference.py
	$(PY) scripts/bench_batch.py
	$(PY) scripts/bench_gcp.py
	$(PY) scripts/bench_tasks.py
	$(PY) scripts/bench_soak.py

clean:  ## remove the virtual environments, local data, trained artifacts and build output
	rm -rf $(VENV) $(TASKS_EMULATOR_VENV) $(CHECKOV_VENV) var models/artifacts .pytest_cache build
