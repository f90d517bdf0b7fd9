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

.PHONY: setup train test test-compose lint bench clean browser lock

# The exact versions CI tested (requirements.lock), not whatever the registry holds today;
# pip check fails the install if the lock lacks a dependency of pyproject.toml or torch.
$(STAMP): pyproject.toml requirements.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

setup: $(STAMP)

# The main job, the documented defaults for 2-bit parity: R-CM, 100 random initialisations.
train: $(STAMP)
	$(BIN)/pmgd train --config configs/parity2-rcm.toml --json out/parity2-rcm.json

# The dashboard's browser test needs Debian's headless Chromium: installed here (as root, or
# through sudo) when missing, never skipped. Another apt (unattended upgrades, a second make)
# may hold the dpkg lock: wait for it up to 5 minutes instead of failing at once.
APT_GET := apt-get -o DPkg::Lock::Timeout=300
browser:
	@test -x $(CHROMIUM) || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO $(APT_GET) update -q && $$SUDO $(APT_GET) install -y -q chromium; }

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint browser
	$(BIN)/python -m pytest

# The cluster in containers, as a compose user meets it (tests/compose): a Docker engine,
# the compose plugin, a base image and the cluster image first (scripts/compose-env.sh:
# each step skipped when done), then `docker compose up` with three nodes and the checks.
test-compose: $(STAMP)
	./scripts/compose-env.sh > .compose-env
	. ./.compose-env && $(BIN)/python -m pytest -m compose tests/compose

# Re-resolve the lock from pyproject.toml in a scratch venv (after changing dependencies).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip==26.3 && .venv-lock/bin/pip install --quiet $(TORCH_SPEC)
	.venv-lock/bin/pip install --quiet -e '.[test]'
	{ sed -n '1,3p' requirements.lock; .venv-lock/bin/pip freeze --exclude-editable | grep -iv '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .venv-lock

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) out
