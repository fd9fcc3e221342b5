# The two commands: `make run` serves the local stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: install run test bench models clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

models: install
	$(PY) scripts/train.py --if-absent

run: install
	$(PY) scripts/run_local.py

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_inference.py
	$(PY) scripts/bench_batch.py

clean:
	rm -rf $(VENV) var models/artifacts .pytest_cache
