# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve demo test lint
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/python run.py serve

demo: $(STAMP)
	$(VENV)/bin/python run.py demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check engine actors sandbox run.py tests bench
	$(VENV)/bin/mypy engine actors
