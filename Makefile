# The two commands: `make demo` and `make test`. Both build .venv from the project's files.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo serve test test-fast test-agent lint bench clean

$(STAMP): pyproject.toml agent/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e "./agent[tf]" -e ".[ml,dev]"
	touch $(STAMP)

demo: $(STAMP)
	env -u DATABASE_URL -u REDIS_URL $(VENV)/bin/python -m downpour.demo

# The portal and the agents' endpoint on the embedded default, data kept in var/serve/
# between runs (HOST, PORT: where it listens; default 127.0.0.1:8000).
serve: $(STAMP)
	env -u DATABASE_URL -u REDIS_URL $(VENV)/bin/python -m downpour.serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# Unit and service-free tests (under 2 minutes): no PostgreSQL, Redis, server or agent
# processes, browser or TensorFlow subprocess; the Django tests run on the embedded default.
FAST_MARKERS := not services and not e2e and not browser and not slow and not desktop and not net
test-fast: $(STAMP)
	DOWNPOUR_NO_SERVICES=1 $(VENV)/bin/python -m pytest -n auto -m "$(FAST_MARKERS)"

# The agent's tests with only agent/ importable, as on a donor's machine.
test-agent: $(STAMP)
	$(VENV)/bin/python tests/agent_alone.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: $(STAMP)
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf var demo-accuracy.png
