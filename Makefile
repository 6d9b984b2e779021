# Two commands: `make demo` runs the region on embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Python 3.11, 3.12 and 3.13 are supported, each with its own lock: requirements.lock for 3.11 (the
# default), requirements-3.12.lock and requirements-3.13.lock, picked by the venv's Python (by
# $(PYTHON)'s before the venv exists): `make venv PYTHON=python3.13 VENV=.venv-3.13`
PYVER := $(shell $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
LOCK := $(if $(filter 3.11,$(PYVER)),requirements.lock,requirements-$(or $(PYVER),unknown).lock)

.PHONY: demo test test-fast lint venv system-deps clean-data bench lock

# $(LOCK): the exact versions the suite passed with on that Python (`make lock` writes it from the venv);
# a fresh install gets those, then renkei itself without resolving anything again.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip check
	@touch $(STAMP)

requirements-%.lock:
	@echo "$@: no lock for $(PYTHON) (Python $(or $(PYVER),not found)); renkei supports 3.11, 3.12 and 3.13" >&2; exit 1

# after changing a dependency in pyproject.toml: install it, run the suite, then record what passed;
# once per supported Python (`make lock PYTHON=python3.12 VENV=.venv-3.12` writes requirements-3.12.lock)
lock:
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' > $(LOCK)

venv: $(STAMP)

# dcmtk (DICOM test peers), Orthanc (a site's PACS) and its DICOMweb plugin, Chromium (dashboard test) and
# dicom3tools (dciodvfy checks the synthetic IODs) and openssl (test certificates for the edge's TLS),
# from Debian's packages, installed when missing and running as root.
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing from Debian:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)"; \
	  fi; \
	fi

demo: venv system-deps
	$(VENV)/bin/renkei demo $(DEMO_ARGS)

# One worker per core: with 3 on CI's 2 cores the suite took 11 min instead of 14, but the region's
# flow runs then missed heartbeats for 60 s and were marked Crashed. Files in collection order
# (--no-loadscope-reorder): tests/conftest.py puts the longest first.
TEST_WORKERS ?= 2
test: venv system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 $(PYTEST_ARGS)

# lint and format (ruff), types (mypy: strict on the kernel, the catalog and the sharing decision),
# the import contracts (import-linter); .ci/run runs this before the suite
LINTED := renkei edge catalog tasks flows dashboards center tests bench
lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy renkei
	$(VENV)/bin/lint-imports

# the tests that need no real part (no program, S3 endpoint, Prefect API or browser) and are not slow:
# tests/conftest.py marks the others `external` from what they use, and fails one that runs a program here
test-fast: venv
	RENKEI_TEST_TIER=fast $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not external and not slow" $(PYTEST_ARGS)

bench: venv system-deps
	$(PY) bench/edge_ingest.py && $(PY) bench/catalog_scale.py --studies 100000 && \
	$(PY) bench/pipeline.py && $(PY) bench/verify.py

clean-data:
	rm -rf renkei-data
