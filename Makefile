# Two entry points do all the set-up on a fresh machine (README "Quick start"):
#   make demo   the miniature Danube recipe on the embedded data (launchers/demo.py, each
#               stage announced as [i/6]): pretrain danube_tiny, SFT it, DPO the SFT model
#               (each stage resumes, or does nothing when done), the DPO model on the
#               H2O-Danube base suite (20 documents per task, offline), one chat exchange
#               with it, the plots (results/plots), then the summary and what to try next
#   make test   the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.danube-installed
TEST_STAMP := $(VENV)/.danube-test-installed

# setuptools' editable build warns on every install that a folder named like the package may
# shadow it ("Editable installation", a BuildBackendWarning, i.e. a UserWarning of the build
# backend's process): by design here (the checkout is what is installed), so not shown.
QUIET_BUILD := PYTHONWARNINGS=ignore::UserWarning

.PHONY: setup setup-test demo test bench bench-data clean

setup: $(STAMP)
setup-test: $(TEST_STAMP)

# torch first: on the CPU machines `pip install torch==2.13.0` takes the local CPU wheel, and
# installing it before anything that depends on torch keeps pip from pulling a CUDA build.
# Where torch is already importable (NGC container, a user's venv) it is left alone. The demo
# needs the package alone; the tests (and the HF benchmarks) add transformers and datasets.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(QUIET_BUILD) $(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(QUIET_BUILD) $(BIN)/python -m pip install -q -e ".[test]"
	tests/helpers/install_slurm.sh
	touch $(TEST_STAMP)

demo: setup
	$(BIN)/python launchers/demo.py

test: setup-test
	$(BIN)/python -m pytest -q

bench: setup-test
	$(BIN)/python bench/throughput.py

bench-data: setup
	$(BIN)/python bench/data_prep.py

clean:
	rm -rf results .pytest_cache
