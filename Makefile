# Two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint check bench soak clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Packages from Debian the tests use: PostgreSQL (throwaway clusters) and nginx.
system-deps:
	bash .ci/install-system-deps.sh

demo: $(STAMP) system-deps
	$(PY) -m gateway demo --policy policies/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

check: $(STAMP)
	$(PY) -m gateway check policies/*.yaml policies/examples/*.yaml

test: $(STAMP) system-deps lint check
	$(VENV)/bin/pytest -q

## Bounded (about 6 minutes here, 20 at most), loopback only; writes bench/results/.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	bash bench/run.sh

soak: $(STAMP)
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/work
