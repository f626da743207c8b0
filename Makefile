# Two commands on a fresh machine (Python >= 3.10, ../shared beside the repository):
#   make repro   set up .venv and run the whole pipeline (dvc repro) -> reports/
#   make test    set up .venv and run the unit tests and the notebooks (pytest --nbval-lax)
# Other targets: setup, status (dvc status), clean (remove runs/ and the executed notebooks).

VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
MAGR_SHARED ?= $(abspath ../shared)
export MAGR_SHARED
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
# OpenMP threads sleep instead of spinning while they wait: on a small machine shared with other jobs,
# spinning threads slow torch's many small ops down by 10-20x (measured: OPTQ on one 576 x 1536 layer
# 12.8 s with the default policy vs 0.8 s with PASSIVE while another 2-thread job ran).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup repro test test-unit test-notebooks status clean

setup: $(VENV)/.magr-installed

$(VENV)/.magr-installed: requirements.txt constraints.txt pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh $(VENV)
	touch $@

repro: setup
	@start=$$(date +%s); \
	dvc repro && \
	end=$$(date +%s) && \
	printf '# Pipeline wall time\n\n`dvc repro` (after setup) took %s s on %s, %s cores, finished %s.\n' \
	  "$$((end - start))" "$$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$$(nproc)" \
	  "$$(date -u +%Y-%m-%dT%H:%MZ)" > reports/pipeline_wall_time.md && \
	cat reports/pipeline_wall_time.md

test: setup test-unit test-notebooks

test-unit:
	$(BIN)/python -m pytest -q tests/

test-notebooks:
	$(BIN)/python -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider notebooks/

status:
	dvc status

clean:
	rm -rf runs reports/notebooks
