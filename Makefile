# The two commands of the README: `make run` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test unit integration bench clean evidently-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 is pinned in constraints.txt: pip takes the CPU wheel from a local find-links
# folder where there is one, and PyPI's wheel elsewhere.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# `matih-ml up`: init, then `serve run serve_config.yaml` listening on the profile's http.host
run: install
	$(BIN)/matih-ml up

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/serving_overhead.py

# Evidently in a venv of its own, for benchmarks/drift.py and the verdict test (never in .venv:
# its pins would move the platform's). evidently 0.7 does not import under pandas 3.
evidently-env: .venv-evidently/bin/python
.venv-evidently/bin/python:
	$(PYTHON) -m venv .venv-evidently
	.venv-evidently/bin/pip install -q evidently 'pandas<3' pyarrow

clean:
	rm -rf $(VENV) .pytest_cache
