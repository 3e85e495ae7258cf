# Two commands: `make run` (whole job on embedded defaults, ends with the API up) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export AIPIC_VAR_DIR ?= $(CURDIR)/var
EVENTS = $(AIPIC_VAR_DIR)/data/marketplace
NB_VAR := $(CURDIR)/var/notebooks

.PHONY: run test install lint typecheck pytest notebooks prepare data features train serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	@touch $(STAMP)

# --- the job: each stage reuses what an earlier run built ---------------------------------
data: $(STAMP)
	@if [ -f $(EVENTS)/payments.parquet ]; then echo "reusing the simulated marketplace in $(EVENTS)"; \
	else $(BIN)/aipic data simulate --out $(EVENTS); fi
	$(BIN)/aipic privacy import-consent --events $(EVENTS)

features: data
	@if [ -f $(AIPIC_VAR_DIR)/feature_repo/.built ]; then echo "reusing the feature store in $(AIPIC_VAR_DIR)/feature_repo"; \
	else $(BIN)/aipic features build --events $(EVENTS) && touch $(AIPIC_VAR_DIR)/feature_repo/.built; fi

train: features
	@if [ -f $(AIPIC_VAR_DIR)/mlflow/.trained ]; then echo "reusing the models registered in $(AIPIC_VAR_DIR)/mlflow"; \
	else $(BIN)/aipic train all --events $(EVENTS) && touch $(AIPIC_VAR_DIR)/mlflow/.trained; fi

prepare: train

serve: prepare
	@echo ""
	@echo "API docs:    http://127.0.0.1:8000/docs"
	@echo "MLflow UI:   $(BIN)/mlflow ui --backend-store-uri sqlite:///$(AIPIC_VAR_DIR)/mlflow/mlflow.db --port 5000"
	@echo "A key:       $(BIN)/aipic auth create-key --scopes score,recommend,events"
	@echo "A token:     $(BIN)/aipic auth issue-token --subject USER_ID"
	$(BIN)/aipic serve --host 127.0.0.1 --port 8000

run: serve

# --- checks ---------------------------------------------------------------------------------
lint: $(STAMP)
	$(BIN)/ruff check features models serving training tests benchmarks
	$(BIN)/ruff format --check features models serving training tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2

# The notebooks read the project's own outputs: build them once under var/notebooks.
notebooks: $(STAMP)
	$(MAKE) --no-print-directory prepare AIPIC_VAR_DIR=$(NB_VAR)
	AIPIC_VAR_DIR=$(NB_VAR) $(BIN)/python -m pytest --nbmake notebooks -p no:xdist -q -p no:cacheprovider

test: lint typecheck pytest notebooks

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
