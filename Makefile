# Two commands for a fresh CPU-only machine: `make demo` serves the tiny demo model on a real
# Triton server and writes outputs/demo.png; `make test` runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU wheel this project's CI uses; any other spec may pull a CUDA build of
# several GB. On a GPU machine install your CUDA torch into the venv first and set TORCH=.
TORCH ?= torch==2.13.0
PROMPT ?= a lighthouse on a cliff at sunset, oil painting

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# perf_analyzer links libb64 (Debian's libb64-0d); the tests need it.
	@dpkg -s libb64-0d >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d) \
	  || echo "install Debian's libb64-0d for perf_analyzer"; }
	@# The playground's browser test drives Debian's chromium through chromium-driver.
	@dpkg -s chromium chromium-driver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	  || echo "install Debian's chromium and chromium-driver for the playground test"; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[server,pytriton,test]"
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py --prompt "$(PROMPT)" --output outputs/demo.png

test: setup
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) outputs
