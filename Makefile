# The two commands of the README. Both create .venv and install every framework when needed.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Adapters with a module so far; `python -m conformance run` takes over once every family has one.
FRAMEWORKS ?= torch

.PHONY: report test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]" 2>&1 \
		| grep -v "^WARNING: Location" || true
	$(PY) -c "import conformance, adapters, torch, numpy"  # fail here, not later, if the install did
	touch $(STAMP)

install: $(STAMP)

report: $(STAMP)
	$(PY) -m pytest conformance --framework=$(FRAMEWORKS) -q -p no:cacheprovider || true
	@echo "results: results/"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m conformance validate cases
	$(PY) -m pytest conformance --framework=$(FRAMEWORKS) -q -n 2 -p no:cacheprovider

clean:
	rm -rf results .pytest_cache
