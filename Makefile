# The README's two commands. Both create .venv and install every framework on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Families for the conformance run: every family by default (`make test FRAMEWORKS=torch` for one).
FRAMEWORKS ?= all

.PHONY: report test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]" 2>&1 \
		| { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import conformance, adapters, reports, torch, tensorflow, tf_keras, tf_slim, keras, jax, flax, onnxruntime"
	$(PY) -c "import onnxscript, tf2onnx, ai_edge_litert, openvino"
	touch $(STAMP)

install: $(STAMP)

# Conformance failures still produce a report, so they do not fail this target.
report: $(STAMP)
	-$(PY) -m conformance run --framework=$(FRAMEWORKS)
	@echo "report: $(CURDIR)/results/report.html"

# Debian's chromium for the report's browser test (tests/test_report_browser.py), installed only
# where this user can (root with apt-get). Elsewhere the test skips and says how to get one; under
# CI=true it fails instead.
CHROMIUM_STAMP := $(VENV)/.chromium-stamp

$(CHROMIUM_STAMP): | $(STAMP)
	@if test -x "$${CHROMIUM:-/usr/bin/chromium}"; then touch $(CHROMIUM_STAMP); \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y chromium && touch $(CHROMIUM_STAMP); \
	else echo "no chromium and no root apt-get: the report's browser test will be skipped" \
		"(install Debian's chromium, or set CHROMIUM=/path/to/chromium)"; fi

test: $(STAMP) $(CHROMIUM_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m conformance validate cases
	$(PY) -m conformance run --framework=$(FRAMEWORKS)

clean:
	rm -rf results .pytest_cache
