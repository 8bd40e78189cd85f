# detnet's front door: `make lab` runs the closed loop on network namespaces,
# `make test` runs every test. Both create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LAB_STAMP := $(VENV)/.installed-lab
PKGS   := native engine controller lab bench

# The shared suite of the Cython core and its pure-Python fallback: everything that runs
# the measurement core (native, engine, the probe and reflect commands, the controller
# process end to end). `make test` runs it a second time with DETNET_NO_EXTENSIONS=1.
CORE_TESTS := $(wildcard tests/unit/test_native_*.py tests/integration/test_native_*.py) \
	$(addprefix tests/unit/test_,$(addsuffix .py,core recorder recorder_two_step ring stats sequence scheduler \
	  parse connections targets tbf slo collector)) \
	$(addprefix tests/integration/test_,$(addsuffix .py,probe_engine probe_engine_dynamic \
	  reflector probe_peers cmd_probe cmd_reflect cmd_control daemon collector_live))

# Debian packages the tests, the lab and the benchmarks use (installed when root).
APT_TEST  := iproute2 prometheus kubectl
APT_BENCH := irtt sockperf  # the peer probers `bench compare` (and its test) measure against

.PHONY: all venv test lint typecheck unit lab bench bench-deps apt-test image clean

all: test

# The lab needs detnet and its runtime dependencies only; the tests add the dev tools.
$(LAB_STAMP): pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxi native/*.pxd)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e .
	@$(PY) -c "import detnet.native as n; print('detnet.native backend:', n.BACKEND)"
	@touch $@

$(STAMP): pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxi native/*.pxd)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[dev,plot]'
	@$(PY) -c "import detnet.native as n; print('detnet.native backend:', n.BACKEND)"
	@touch $@ $(LAB_STAMP)

venv: $(STAMP)

# mypy maps modules to folders; this link tree shows it the installed `detnet.*` layout.
.typecheck/detnet: Makefile
	@rm -rf .typecheck && mkdir -p $@
	@for p in $(PKGS); do ln -s ../../$$p $@/$$p; done

apt-test:
	@missing=""; \
	command -v tc >/dev/null || missing="$$missing iproute2"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubectl"; \
	for p in $(APT_BENCH); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: tests needing$$missing will skip"; fi; \
	fi

lint: $(STAMP) .typecheck/detnet
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

typecheck: lint

test: $(STAMP) apt-test lint
	$(PY) -m pytest -q
	DETNET_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "not slow" $(CORE_TESTS)

lab: $(LAB_STAMP)
	@if [ "$$(id -u)" = 0 ]; then $(VENV)/bin/detnet lab; \
	else $(VENV)/bin/detnet lab --unshare; fi

bench-deps: $(STAMP)
	@missing=""; for p in $(APT_BENCH); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: cannot install$$missing; compare will report them as skipped"; fi; \
	fi

# The container image of deploy/Dockerfile, with whichever builder this machine has.
VERSION = $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image:
	@for b in docker podman buildah; do \
	  if command -v $$b >/dev/null; then \
	    if [ $$b = buildah ]; then set -x; buildah bud -f deploy/Dockerfile -t detnet:$(VERSION) .; \
	    else set -x; $$b build -f deploy/Dockerfile -t detnet:$(VERSION) .; fi; exit $$?; \
	  fi; \
	done; \
	echo "make image: no docker, podman or buildah on this machine; install one, or build deploy/Dockerfile elsewhere" >&2; exit 1

bench: bench-deps
	$(VENV)/bin/detnet bench all --json bench-results.json

clean:
	rm -rf build .typecheck native/_core.c native/*.so .pytest_cache .mypy_cache .ruff_cache
