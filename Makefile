# Two commands set everything up on a fresh machine:
#   make demo   builds a tiny GPT-2-shaped example and merges an adapter into it as ONNX
#   make test   runs the linter and the test suite (building llama.cpp once, cached outside the
#               clone in ~/.cache/loraformat or $LORAFORMAT_LLAMA_CPP, for the tests against it)
#   make test-fast  the linter and the tests not marked slow (the inner loop; no llama.cpp build)
# Both create .venv and install what they need. torch==2.13.0 is installed first so pip never
# resolves a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
THIRD_PARTY := $(if $(wildcard tests/third_party_plugin/pyproject.toml),-e tests/third_party_plugin,)
EXAMPLE := build/example

.PHONY: setup demo test test-fast lint bench clean llama-cpp

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard tests/third_party_plugin/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' $(THIRD_PARTY)
	touch $@

demo: setup
	$(PY) tools/build_example.py $(EXAMPLE)
	$(VENV)/bin/loraformat inspect $(EXAMPLE)/adapter
	$(VENV)/bin/loraformat validate $(EXAMPLE)/adapter
	$(VENV)/bin/loraformat merge $(EXAMPLE)/base $(EXAMPLE)/adapter -o $(EXAMPLE)/model.onnx --verify --overwrite

lint: setup
	$(VENV)/bin/ruff check .

llama-cpp: setup
	$(PY) tools/build_llama_cpp.py

test: lint llama-cpp
	LORAFORMAT_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

clean:
	rm -rf $(VENV) build .pytest_cache
