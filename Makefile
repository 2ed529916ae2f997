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

.PHONY: install demo serve test test-fast bench bench-quick train-demo-model clean browser

install: $(STAMP)

$(STAMP): pyproject.toml integrations/langchain-oprm/pyproject.toml integrations/llama-index-oprm/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]" -e "integrations/langchain-oprm[dev]" -e "integrations/llama-index-oprm[test]"
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's Chromium for the web app's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: install
	$(VENV)/bin/oprm-rag demo

serve: install
	$(VENV)/bin/oprm-rag serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not browser"

bench-quick: install
	$(PY) -m benchmarks.run_all --quick

bench: install
	$(PY) -m benchmarks.run_all

train-demo-model: install
	$(PY) training/train_demo_model.py --out oprm_rag/demo/model

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
