# Two commands: `make run` (whole job on embedded defaults, ends with the API up) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export AIPIC_VAR_DIR ?= $(CURDIR)/var
EVENTS := $(AIPIC_VAR_DIR)/data/marketplace

.PHONY: run test install lint typecheck pytest clean data features train serve

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	@touch $(STAMP)

data: $(STAMP)
	@if [ -f $(EVENTS)/payments.parquet ]; then echo "reusing simulated marketplace in $(EVENTS)"; \
	else $(BIN)/aipic data simulate --out $(EVENTS); fi

features: data
	$(BIN)/aipic features build --events $(EVENTS)

train: features
	$(BIN)/aipic train all --events $(EVENTS)

serve: train
	@echo ""
	@echo "API docs:   http://127.0.0.1:8000/docs"
	@echo "MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(AIPIC_VAR_DIR)/mlflow/mlflow.db --port 5000"
	@echo "Dev key:    $(BIN)/aipic auth create-key --scopes score,recommend,events"
	$(BIN)/aipic serve --host 127.0.0.1 --port 8000

run: serve

lint: $(STAMP)
	$(BIN)/ruff check features models serving training tests benchmarks
	$(BIN)/ruff format --check features models serving training tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2

test: lint typecheck pytest

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
