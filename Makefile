# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# Without CUDA, pin the CPU wheel (it lies on local disk); an unpinned torch drags a multi-GB CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[dev,hf]" "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/moekit demo

test: venv
	$(VPY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check src tests bench

bench: venv
	$(VPY) bench/ep_cpu.py

clean:
	rm -rf $(VENV) reports .pytest_cache
