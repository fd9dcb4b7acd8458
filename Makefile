# Two commands do all set-up:  `make demo` (train both stages, quick preset, then a sample grid)
# and `make test`.  Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# MNIST: $(DATA) or $LATENTDIFF_DATA if set; else an offline copy in ../shared/data if there is one;
# else torchvision downloads it into ./data.
DATA ?= $(LATENTDIFF_DATA)
ifeq ($(DATA),)
  ifneq ($(wildcard ../shared/data/MNIST/raw),)
    DATA := ../shared/data
  endif
endif
DATA_ARG := $(if $(DATA),--data-dir $(DATA),)
PRESET ?= quick
# The showcase grid uses stronger guidance than the model's FLD-optimal default (crisper, less varied).
GUIDANCE ?= 3
RUNS ?= runs
# accelerate launch gives each process 1 CPU thread unless told otherwise; use every core.
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no \
          --num_cpu_threads_per_process $(shell nproc)

.PHONY: venv test docs demo distill sample clean web

# What `make demo` needs: the package and the serve extra (the web page after the demo). --no-compile skips
# byte-compiling all of torch up front (~30 s of a fresh `make demo`); Python compiles what it imports.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e '.[serve]'
	touch $@

# What `make test` adds: pytest and friends, tensorboard (the tracker tests), onnx (the export tests), lora (peft: the
# LoRA teaching tests).
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e '.[test,serve,tensorboard,onnx,lora]'
	touch $@

venv: $(VENV)/.installed

# The browser page's one npm package, onnxruntime-web, at the version web/package-lock.json pins (from the npm
# registry; vendored into the built page, never loaded from a CDN). `make test` installs it where npm exists.
ORT_WEB := web/node_modules/.package-lock.json
$(ORT_WEB): web/package.json web/package-lock.json
	npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@
TEST_WEB := $(if $(shell command -v npm),$(ORT_WEB))

# One pytest worker per core, at most 4 (pytest-xdist): the training tests run one-thread subprocesses, so a
# single worker leaves the other cores idle. TEST_JOBS=0 runs everything in one process.
TEST_JOBS ?= auto
test: $(VENV)/.test-installed $(TEST_WEB)
	$(PY) -m pytest -q -n $(TEST_JOBS) --maxprocesses 4 --dist worksteal tests

# The documentation site into site/ (the docs extra on first use); --strict fails on a broken link or reference.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

# The browser page, where `make web` built it, becomes the site's try/ (docs/try-it.md frames it).
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	if [ -f $(WEB_OUT)/index.html ]; then rm -rf site/try && cp -r $(WEB_OUT) site/try; fi

# The static page that samples a distilled student in the browser (docs/onnx.md) into $(WEB_OUT): export
# $(WEB_MODEL) to ONNX, add web/'s page and the vendored onnxruntime-web. Serve the folder with any static server.
WEB_MODEL ?= $(RUNS)/ldm_fast
WEB_OUT ?= build/web
$(VENV)/.onnx-installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e '.[serve,onnx]'
	touch $@

web: $(VENV)/.onnx-installed $(ORT_WEB)
	$(PY) -m latentdiff.export --model $(WEB_MODEL) --out $(WEB_OUT) --page

demo: venv
	$(LAUNCH) train_vae.py --config $(PRESET) --out $(RUNS)/vae $(DATA_ARG) $(ARGS)
	$(LAUNCH) train_ldm.py --config $(PRESET) --vae $(RUNS)/vae --out $(RUNS)/ldm $(DATA_ARG) $(ARGS)
	$(PY) sample.py --model $(RUNS)/ldm --labels 0 1 2 3 4 5 6 7 8 9 --per-label 8 --guidance $(GUIDANCE) --out $(RUNS)/samples.png
	@echo "samples: $(RUNS)/samples.png"
	$(if $(DISTILL),$(MAKE) distill)

# Few-step student of $(RUNS)/ldm (docs/distillation.md); `make demo DISTILL=1` runs it after the demo. Where npm
# exists it then builds the browser page from the student (`make web`: build/web, the docs site's Try it page).
# DISTILL_CONFIG=progressive: guided progressive distillation instead of LCD (configs/distill_progressive.yaml);
# the default is the preset's own distill config, or quick's for a preset without one (hour).
DISTILL_CONFIG ?= $(if $(wildcard configs/distill_$(PRESET).yaml),$(PRESET),quick)
distill: venv
	$(LAUNCH) distill_ldm.py --config $(DISTILL_CONFIG) --teacher $(RUNS)/ldm --out $(RUNS)/ldm_fast $(DATA_ARG) $(ARGS)
	$(PY) sample.py --model $(RUNS)/ldm_fast --labels 0 1 2 3 4 5 6 7 8 9 --per-label 8 --out $(RUNS)/samples_fast.png
	@echo "samples of the student: $(RUNS)/samples_fast.png"
	$(if $(shell command -v npm),$(MAKE) web WEB_MODEL=$(RUNS)/ldm_fast,@echo "npm not found: no browser page (install npm, then make web)")

clean:
	rm -rf $(VENV) .pytest_cache site build web/node_modules
