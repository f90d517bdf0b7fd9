# Two entry points (README quick start): `make train` and `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default pin is the
# CPU wheel these machines hold on local disk; a GPU user passes a CUDA build, e.g.
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium

.PHONY: setup train test bench clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job, the documented defaults for 2-bit parity: R-CM, 100 random initialisations.
train: $(STAMP)
	$(BIN)/pmgd train --config configs/parity2-rcm.toml --json out/parity2-rcm.json

# The dashboard's browser test needs Debian's headless Chromium: installed here (as root, or
# through sudo) when missing, never skipped.
browser:
	@test -x $(CHROMIUM) || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) out
