#!/usr/bin/env bash
# Packages for a bare CUDA machine that has torch (and pytest, transformers, tokenizers, psutil)
# but not what danube adds: megatron-core and Hydra, at the versions of this checkout's .venv.
# Downloads them for that machine's Python into .whl/ (git-ignored); installs nothing here:
#
#   bench/gpu_wheels.sh [3.12]
#
# There, from the repository root (antlr4 4.9.3, which omegaconf pins, is a pure-Python sdist):
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*
#   PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_acceptance.py --skip-cpu-suite
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "megatron-core==$(version megatron-core)" "hydra-core==$(version hydra-core)" \
    "omegaconf==$(version omegaconf)"
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -1 .whl
