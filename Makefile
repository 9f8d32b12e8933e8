# Set-up and entry points; the README's first commands call these.
PYTHON ?= python3

.PHONY: setup test test-fast

setup:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

test: setup
	$(PYTHON) -m pytest Testing -ra

test-fast: setup
	$(PYTHON) -m pytest Testing -m "not slow"
