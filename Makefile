# The two commands: `make run` serves the local stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The Cloud Tasks emulator pins an old protobuf, so it lives in a virtual environment of its own.
TASKS_EMULATOR_VENV ?= .venv-tasks-emulator
TASKS_EMULATOR_REQUIREMENTS := tests/emulators/requirements-tasks-emulator.txt
export PYTHONPATH := $(CURDIR)

.PHONY: install emulators run test bench models clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TASKS_EMULATOR_VENV)/.installed: $(TASKS_EMULATOR_REQUIREMENTS)
	$(PYTHON) -m venv $(TASKS_EMULATOR_VENV)
	$(TASKS_EMULATOR_VENV)/bin/python -m pip install --quiet -r $(TASKS_EMULATOR_REQUIREMENTS)
	touch $@

install: $(VENV)/.installed

emulators: $(TASKS_EMULATOR_VENV)/.installed

models: install
	$(PY) scripts/train.py --if-absent

run: install
	$(PY) scripts/run_local.py

test: install emulators
	$(PY) -m pytest -q

bench: install emulators
	$(PY) scripts/bench_inference.py
	$(PY) scripts/bench_batch.py
	$(PY) scripts/bench_gcp.py
	$(PY) scripts/bench_tasks.py

clean:
	rm -rf $(VENV) $(TASKS_EMULATOR_VENV) var models/artifacts .pytest_cache
