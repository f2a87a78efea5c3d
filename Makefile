# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= deepseek-ai/Janus-1.3B
ARGS ?=

.PHONY: install serve test bench

$(BIN)/janus-server: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/janus-server

serve: install
	$(BIN)/janus-server serve --model $(MODEL) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -rs $(ARGS)
