# Two commands on a fresh machine (Python >= 3.10, ../shared beside the repository):
#   make repro   set up .venv and run the whole pipeline (dvc repro) -> reports/
#   make test    set up .venv (with magr[export,test]: the export loaders and Triton) and run the unit tests
#                (the Triton kernels in Triton's CPU interpreter among them) and the notebooks (pytest --nbval-lax)
# Other targets: setup, status (dvc status), clean (remove runs/ and the executed notebooks),
# store-notebooks (re-execute the notebooks and store the outputs nbval compares).

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
# spinning threads slow torch's many small ops down badly.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup setup-test repro test test-unit test-notebooks store-notebooks status clean gpu-assets gpu-check

setup: $(VENV)/.magr-installed

$(VENV)/.magr-installed: requirements.txt constraints.txt pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh $(VENV)
	touch $@

# the tests also load exported checkpoints with their third-party loaders (magr[export]: gptqmodel, ...) and run
# the Triton kernels in Triton's interpreter on the CPU (magr[test]: triton, 286 MB wheel, 1.0 GB installed)
setup-test: $(VENV)/.magr-test-installed

$(VENV)/.magr-test-installed: $(VENV)/.magr-installed pyproject.toml
	PYTHON=$(PYTHON) EXTRAS=export,test bash scripts/setup.sh $(VENV)
	touch $@

repro:
	@t0=$$(date +%s); \
	$(MAKE) --no-print-directory setup && t1=$$(date +%s) && \
	dvc repro && t2=$$(date +%s) && \
	printf '# Pipeline wall time\n\n`make repro`: %s s in all (setup %s s, `dvc repro` %s s) on %s, %s cores, finished %s.\n' \
	  "$$((t2 - t0))" "$$((t1 - t0))" "$$((t2 - t1))" "$$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
	  "$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" "$$(date -u +%Y-%m-%dT%H:%MZ)" > reports/pipeline_wall_time.md && \
	printf '\nSeconds per stage (scripts/stage_times.py: from each stage'"'"'s newest output in dvc.lock):\n\n' \
	  >> reports/pipeline_wall_time.md && \
	$(BIN)/python scripts/stage_times.py --dvc-seconds "$$((t2 - t1))" --setup-seconds "$$((t1 - t0))" \
	  >> reports/pipeline_wall_time.md && \
	cat reports/pipeline_wall_time.md

test: setup-test test-unit test-notebooks

test-unit:
	$(BIN)/python -m pytest -q tests/

test-notebooks:
	$(BIN)/python -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider notebooks/

store-notebooks: setup
	$(BIN)/python scripts/store_notebooks.py

# GPU acceptance check (issue 21; README "GPU acceptance check"): gpu-assets here (.venv, ../shared: stories260K and
# TinyStories tokens, 1.4 MB, into .gpu/assets, which a device call carries), gpu-check with the device's own Python
GPU_PYTHON ?= python3
gpu-assets: setup
	$(BIN)/python scripts/gpu_check.py --prepare-assets .gpu/assets

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(if $(OUT),--out $(OUT)/gpu_check.md)

status:
	dvc status

clean:
	rm -rf runs reports/notebooks
