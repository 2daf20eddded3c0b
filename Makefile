# isara: two commands for a newcomer.
#   make demo   sets up, then runs the main job on the embedded default model
#   make test   sets up, then runs the tests (the whole suite: what CI runs)
#   make test-fast   everything but the whole-pipeline runs and the slow builds, for the edit-test loop
#   make gpu-check   the consumer-GPU path end to end with timings, where CUDA is present (tests/test_gpu.py)
# `make setup` is idempotent: on a set-up machine it takes seconds. Builds live
# in ${XDG_CACHE_HOME:-~/.cache}/isara (outside the repo) and are reused by
# every clone.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
ISARA  := $(VENV)/bin/isara
PYTEST_ARGS ?=
# make demo: the safety domain, 3 iterations (examples/safety.toml);
# make demo DEMO=quick: the same pipeline small (examples/safety-quick.toml).
DEMO ?=
DEMO_CONFIG := examples/safety$(if $(DEMO),-$(DEMO),).toml
# make demo-draws: the demo over DRAWS generation seeds, its baselines computed once, with SFT on the seeds
# trained as long as each iteration (runs/safety-draws.md).
DRAWS ?= 3

.PHONY: setup test test-fast gpu-check demo demo-draws doctor bench clean-venv

setup: $(VENV)/.installed
	$(VPY) -m server.toolchain build
	$(ISARA) models pull

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# torch first (never a CUDA build on a CPU machine), then llama-cpp-python built
# from the pinned sdist with portable flags (and ccache when installed), then the project.
$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m server.toolchain torch
	$(VPY) -m server.toolchain binding
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(VPY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(VPY) -m pytest -m "not pipeline and not slow" $(PYTEST_ARGS)

# The consumer-GPU path (tests/test_gpu.py, the `gpu` marker): llama.cpp's CUDA build, Unsloth LoRA and QLoRA on
# the tiny and the default model, export, verification, serving; timings printed and written to GPU_CHECK_OUT.
# Where torch sees no CUDA GPU it says why in one line and exits 0: no GPU is nothing to check, not a failure
# (`make test` skips the same tests there, each with that line). On a GPU machine `make setup` builds the CUDA
# flavour; the [unsloth] extra is installed with the installed torch held, so no resolver swaps its build.
GPU_CHECK_OUT ?= runs/gpu-check.json
GPU_PROBE := import sys, torch; cuda = torch.version.cuda or "none"; ok = torch.cuda.is_available(); ok or print( \
f"make gpu-check: nothing to check: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build: {cuda})"); \
sys.exit(0 if ok else 3)

gpu-check: $(VENV)/.installed
	@$(VPY) -c '$(GPU_PROBE)' || { rc=$$?; [ $$rc -eq 3 ] && exit 0; exit $$rc; }; \
	$(MAKE) --no-print-directory setup && \
	$(VPY) -c 'import torch; print("torch==" + torch.__version__)' > $(VENV)/torch-held.txt && \
	$(VPY) -m pip install --quiet -c $(VENV)/torch-held.txt -e '.[dev,unsloth]' && \
	ISARA_GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(VPY) -m pytest -m gpu --durations=0 $(PYTEST_ARGS)

demo: setup
	$(ISARA) doctor
	$(ISARA) run $(DEMO_CONFIG)

demo-draws: setup
	$(ISARA) doctor
	$(ISARA) run $(DEMO_CONFIG) --draws $(DRAWS) --set eval.sft_matched=true

doctor: $(VENV)/.installed
	$(ISARA) doctor

bench: setup
	$(ISARA) bench

clean-venv:
	rm -rf $(VENV)
