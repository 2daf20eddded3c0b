# isara: two commands for a newcomer.
#   make demo   sets up, then runs the main job on the embedded default model
#   make test   sets up, then runs the tests (the whole suite: what CI runs)
#   make test-fast   everything but the whole-pipeline runs and the slow builds, for the edit-test loop
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
# make demo-draws: the demo over DRAWS generation seeds, its baselines computed once (runs/safety-draws.md).
DRAWS ?= 3

.PHONY: setup test test-fast demo demo-draws doctor bench clean-venv

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

demo: setup
	$(ISARA) doctor
	$(ISARA) run $(DEMO_CONFIG)

demo-draws: setup
	$(ISARA) doctor
	$(ISARA) run $(DEMO_CONFIG) --draws $(DRAWS)

doctor: $(VENV)/.installed
	$(ISARA) doctor

bench: setup
	$(ISARA) bench

clean-venv:
	rm -rf $(VENV)
