# Set-up and entry points; the README's first commands call these.
PYTHON ?= python3

.PHONY: setup setup-system test test-fast

# plastimatch and dicom3tools (dciodvfy) are the independent DICOM RT peers the tests use
setup-system:
	@command -v plastimatch >/dev/null && command -v dciodvfy >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq plastimatch dicom3tools >/dev/null; }

setup: setup-system
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

test: setup
	$(PYTHON) -m pytest Testing -ra

test-fast: setup
	$(PYTHON) -m pytest Testing -m "not slow"
