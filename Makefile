# Two commands: `make demo` runs the region on embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv system-deps clean-data bench lock

# requirements.lock: the exact versions the suite passed with (`make lock` writes it from the venv);
# a fresh install gets those, then renkei itself without resolving anything again.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip check
	@touch $(STAMP)

# after changing a dependency in pyproject.toml: install it, run the suite, then record what passed
lock:
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' > requirements.lock

venv: $(STAMP)

# dcmtk (DICOM test peers), Orthanc (a site's PACS), Chromium (dashboard test) and
# dicom3tools (dciodvfy checks the synthetic IODs) and openssl (test certificates for the edge's TLS),
# from Debian's packages, installed when missing and running as root.
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
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

TEST_WORKERS ?= 2
test: venv system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: venv system-deps
	$(PY) bench/edge_ingest.py && $(PY) bench/catalog_scale.py --studies 100000 && \
	$(PY) bench/pipeline.py && $(PY) bench/verify.py

clean-data:
	rm -rf renkei-data
