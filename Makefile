# linerec developer tasks. `make demo` and `make test` do all the set-up themselves:
# missing Debian packages (apt-get, as root or through sudo), then a .venv with linerec.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What the tests and the demo need from Debian: the C libraries the Python bindings build
# against or load, the broker, the Opus tools that judge the files, and speech for tests.
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libasound2-dev \
	libopus0 libsystemd-dev systemd mosquitto opus-tools espeak-ng sox age faketime \
	stress-ng

.PHONY: all setup system-packages demo test bench lint typecheck clean

all: test

setup: system-packages $(BIN)/.installed

system-packages:
	@scripts/install-system-packages $(APT_PACKAGES)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $@

demo: setup
	$(BIN)/linerec demo

test: setup
	$(BIN)/python -m pytest

# Figures for docs/BENCHMARKS.md and bench/results.json; takes a few minutes.
bench: setup
	$(BIN)/python bench/run.py

lint: setup typecheck
	$(BIN)/ruff check .

# mypy follows `linerec.*` imports through a view of the source folders under their
# package names (the editable install's import hook is invisible to it).
typecheck: setup
	@mkdir -p build/typecheck/linerec
	@for p in daemon hw audio; do ln -sfn ../../../$$p build/typecheck/linerec/$$p; done
	MYPYPATH=build/typecheck $(BIN)/mypy -p linerec.daemon -p linerec.hw -p linerec.audio
	MYPYPATH=build/typecheck:tests $(BIN)/mypy bench/run.py bench/soak.py

clean:
	rm -rf $(VENV) build dist *.egg-info linerec-sim .pytest_cache .mypy_cache .ruff_cache

# The Debian package and the appliance image (docs/INSTALL.md, image/README.md).
.PHONY: package check-package lint-shell

# The Debian package for this machine's architecture, in dist/.
package:
	scripts/build-deb

# Builds the package, lints it, installs it into a fresh Debian 12 root (debootstrap,
# cached in /var/cache/linerec-ci) and checks it there with the image stage's units. Root.
check-package:
	scripts/check-package

# ShellCheck on every shell script: scripts/, packaging/, image/ and .ci/run.
lint-shell:
	scripts/lint-shell

# The soak (docs/RELIABILITY.md, bench/soak-results.json): 2000 simulated calls over four
# lines faster than real time, then an hour of calls paced to the clock on two lines, every
# call checked, RSS, descriptors and threads watched. Well over an hour; tests/test_soak.py
# runs a short version. A smaller one: $(BIN)/python bench/soak.py --calls 400 --paced-s 300
.PHONY: soak
soak: setup
	$(BIN)/python bench/soak.py
