# The two commands: `make demo` and `make test`. Both build .venv from the project's files.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml agent/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e "./agent[tf]" -e ".[ml,dev]"
	touch $(STAMP)

demo: $(STAMP)
	env -u DATABASE_URL -u REDIS_URL $(VENV)/bin/python -m downpour.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: $(STAMP)
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf var demo-accuracy.png
