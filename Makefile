# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Each creates .venv when missing. TORCH pins the build that lies on the development machines' disk;
# any torch>=2.1 works (e.g. make TORCH="torch torchvision" for the newest).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
DEMO_OUT ?= wsss-demo

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/wsss demo --out $(DEMO_OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
