# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv from nothing when it is absent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv benchmark clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# CPU build of torch from the local wheel cache or the PyTorch CPU index: never the
	@# multi-GB CUDA build. GPU users: see README "CUDA".
	$(BIN)/python -m pip install --quiet "torch==2.13.0" \
		|| $(BIN)/python -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/defectlab demo --out demo-output

test: $(STAMP)
	@scripts/ensure-chromium
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
