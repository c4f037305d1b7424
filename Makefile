# ragtrain: the two commands are `make demo` (the default pipeline) and `make test`.
# Both create the virtualenv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# torch is installed first, on its own, so that a CPU-only machine gets a CPU build:
# here pip finds the local torch==2.13.0+cpu file; elsewhere pass
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu   (CPU wheels)
# or TORCH_SPEC=torch (a CUDA build from PyPI on a GPU machine).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_EXTRA ?=
# Where `make demo` takes its data from; empty = data.source in params.yaml (the official URL).
DATA_SOURCE ?=
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api
# the work pool prefect.yaml deploys to (`prefect deploy --all` ignores --pool)
PREFECT_POOL := ragtrain-process
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo test test-fast lint dvc-yaml clean-venv mlflow-ui ui ui-stop report \
  deploy-flows worker constraints

# The other packages: uv installs them where it can (pip puts it into the venv, then it
# downloads and unpacks in parallel: the venv in 45 s against 92 s for pip alone on 2
# cores), else pip (INSTALLER=pip picks pip). torch stays pip's, with pip's own configuration
# (index, find-links), so the CPU build above is what both keep. Both install under
# constraints.txt: the versions the committed reference run was made with (`make constraints`
# rewrites it from this venv), so a fresh clone gets them, not whatever was released since;
# `make venv CONSTRAINTS=` installs the newest releases within pyproject.toml's ranges.
INSTALLER ?= uv
CONSTRAINTS ?= constraints.txt

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install -q uv; then \
	  $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python \
	    $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(foreach l,$(PIP_FIND_LINKS),--find-links $(l)) \
	    -e ".[dev]" $(PIP_EXTRA); \
	else \
	  $(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" $(PIP_EXTRA); \
	fi
	touch $@

venv: $(VENV)/.installed

# The default pipeline: dvc repro under one MLflow run (then push data and outputs to the
# DVC remote). Each stage runs under jemalloc where the system has it (ragtrain/allocator.py;
# RAGTRAIN_MALLOC=system turns it off).
demo: venv
	$(if $(DATA_SOURCE),ragtrain params set data.source=$(DATA_SOURCE))
	ragtrain pipeline
	dvc push -q || echo "dvc push failed: check the remote (dvc remote list)"
	@echo; echo "metrics: metrics/*.json (dvc metrics show / dvc metrics diff); runs: make mlflow-ui; report: reports/report.html; promote the new @challenger: ragtrain promote"

# The whole test suite, slow integration tests included (what CI runs). pytest-xdist runs
# TEST_WORKERS test modules at a time (a module's tests and its module-scoped fixtures stay in
# one worker): most slow tests are one-core chains of subprocesses and server starts, so two
# workers fit 2 cores; the slowest modules start first (tests/conftest.py: MODULE_SECONDS).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 \
	  $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Everything but the slow integration tests.
test-fast: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" \
	  -n $(TEST_WORKERS) --dist loadfile

# The MLflow UI for the project's store (sqlite under mlruns/) on http://127.0.0.1:$(MLFLOW_PORT)
mlflow-ui: venv
	mkdir -p mlruns/artifacts
	mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlruns/artifacts

# Serve the registered champion RAG model (mlflow models serve) on
# http://127.0.0.1:$(SERVE_PORT)/invocations, from the project's store (or MLFLOW_TRACKING_URI).
SERVE_PORT ?= 5001
MODEL_NAME ?= ragtrain-rag
.PHONY: serve
serve: venv
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db} \
	  mlflow models serve -m models:/$(MODEL_NAME)@champion --env-manager local \
	  -h 127.0.0.1 -p $(SERVE_PORT)

# A Prefect server on 127.0.0.1:$(PREFECT_PORT) and the served deployments, in the background:
# open the UI, pick rag-train-eval/train-eval, edit parameters, Run. `make ui-stop` ends both.
ui: venv
	mkdir -p $(PREFECT_HOME)
	PREFECT_SERVER_UI_API_URL=$(PREFECT_API) nohup prefect server start --host 127.0.0.1 \
	  --port $(PREFECT_PORT) > $(PREFECT_HOME)/server.log 2>&1 & echo $$! > $(PREFECT_HOME)/server.pid
	for i in $$(seq 120); do $(BIN)/python -c "import urllib.request as u; \
	  u.urlopen('$(PREFECT_API)/health', timeout=2)" 2>/dev/null && break; sleep 1; done
	PREFECT_API_URL=$(PREFECT_API) nohup $(BIN)/python flows/serve.py \
	  > $(PREFECT_HOME)/serve.log 2>&1 & echo $$! > $(PREFECT_HOME)/serve.pid
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (deployments rag-train-eval/train-eval, promote/promote, evaluate-champion/evaluate-champion);" \
	  "logs in $(PREFECT_HOME)/*.log; stop with make ui-stop"

# The served flows first (they pause their deployments on the server), then the server.
ui-stop:
	-@for name in serve server; do f=$(PREFECT_HOME)/$$name.pid; test -f $$f || continue; \
	  pid=$$(cat $$f); kill -TERM $$pid 2>/dev/null; \
	  for i in $$(seq 20); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	  kill -KILL $$pid 2>/dev/null; rm -f $$f; echo "stopped $$name ($$pid)"; done

# The deployments of prefect.yaml on the process work pool $(PREFECT_POOL), on the server of
# `make ui` (created when missing; deploying again updates them). docs/prefect-workers.md
deploy-flows: venv
	@$(BIN)/python -c "import urllib.request as u; u.urlopen('$(PREFECT_API)/health', timeout=2)" \
	  2>/dev/null || { echo "no Prefect server at $(PREFECT_API): run make ui first"; exit 1; }
	export PREFECT_API_URL=$(PREFECT_API); \
	  { prefect work-pool inspect $(PREFECT_POOL) >/dev/null 2>&1 \
	    || prefect work-pool create $(PREFECT_POOL) --type process; } \
	  && prefect deploy --all --no-prompt

# A worker on $(PREFECT_POOL), in the foreground (Ctrl-C stops it): it runs the flow runs of
# the deployments above, e.g. `prefect deployment run 'rag-train-eval/train-eval-worker'` or
# the UI's Run button, each in a new process in this checkout.
worker: deploy-flows
	PREFECT_API_URL=$(PREFECT_API) prefect worker start --pool $(PREFECT_POOL)

# The run report of the current outputs (the pipeline's last stage draws it too): one
# self-contained page, also the offline view of the DVC plots (`dvc plots show` needs a CDN).
report: venv
	ragtrain report
	@echo "open reports/report.html in a browser"

lint: venv
	$(BIN)/ruff check src tests flows bench
	ragtrain dag --check

# dvc.yaml from the stage table (src/ragtrain/pipeline/stages.py): run after changing a stage
# or the imports of a module a stage uses.
dvc-yaml: venv
	ragtrain dag --write

clean-venv:
	rm -rf $(VENV)

# constraints.txt from this venv's packages (not torch, whose build is the machine's, nor the
# installers): run after a deliberate upgrade, in the commit that moves the reference run.
constraints: venv
	{ echo "# The package versions of the committed reference run (make constraints); make venv"; \
	  echo "# installs under them. torch is pinned by the Makefile (TORCH_SPEC) instead."; \
	  $(BIN)/python -m pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|pip|setuptools|wheel|uv)==' | LC_ALL=C sort -f; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
