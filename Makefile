# Set-up and entry points; the README's first commands call these.
PYTHON ?= python3

.PHONY: install setup-system demo test test-fast

# CPU PyTorch from the local wheel cache where present, then DoseDiffLib with test extras
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

# plastimatch and dicom3tools (dciodvfy) are the independent DICOM RT peers the tests use
setup-system:
	@command -v plastimatch >/dev/null && command -v dciodvfy >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq plastimatch dicom3tools >/dev/null; }

# the main job: a prediction on the embedded phantom with the bundled model (no download)
demo: install
	dosediff demo --out dosediff-demo-$$(date +%Y%m%d-%H%M%S)

test: setup-system install
	$(PYTHON) -m pytest Testing -ra

test-fast: setup-system install
	$(PYTHON) -m pytest Testing -m "not slow"
