#!/usr/bin/env bash
# Packages for a bare CUDA machine that has torch (and pytest, transformers, tokenizers, psutil:
# bench/gpu_machine_packages.txt lists what the lent GPU machines hold) but not what danube
# adds: megatron-core, Hydra and the rest below, at the versions of this checkout's .venv.
# Downloads them for that machine's Python into .whl/ (git-ignored); installs nothing here:
#
#   bench/gpu_wheels.sh [3.12]
#
# There, from the repository root (antlr4 4.9.3, which omegaconf pins, is a pure-Python sdist):
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*
#   PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_acceptance.py --skip-cpu-suite
#
# What the GPU stages import and that machine lacks (tests/test_gpu_path.py checks the two
# lists below against the imports): megatron-core, Hydra/OmegaConf (configs), fasteners
# (danube.data.gpt's index-cache lock).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
wheels=(megatron-core hydra-core omegaconf fasteners)
sdists=(antlr4-python3-runtime)
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pinned() { for name in "$@"; do echo "$name==$(version "$name")"; done; }
mkdir -p .whl
# shellcheck disable=SC2046  # one argument per pinned name
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(pinned "${wheels[@]}")
# shellcheck disable=SC2046
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl $(pinned "${sdists[@]}")
ls -1 .whl
