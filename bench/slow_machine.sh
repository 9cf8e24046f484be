#!/usr/bin/env bash
# Run a command as if on the slow 2-core machines the quick start is sized for (danube_tiny
# at ~1,300 tokens/s in fp32): a CPU quota on a cgroup holding the command and everything it
# starts, and ATen/oneDNN held to AVX2 kernels. Needs root (a writable cgroup file system).
#
#   bench/slow_machine.sh [--quota US] -- COMMAND ...
#
# --quota: microseconds of CPU per 100 ms for the whole group (default 86000: on the 2-core
# AVX512-BF16 EPYC of 2026-12-06, 3,550-3,835 tokens/s unthrottled, it gives 1,310-1,350).
# Calibrate on another machine by the tokens/s a short pretraining prints:
#   bench/slow_machine.sh -- .venv/bin/python launchers/pretrain.py trainer.precision=32 \
#       trainer.max_steps=30 exp_manager.name=calibrate
# The demo's work on those machines is fp32 (`auto` picks it there): pass --precision 32.
set -euo pipefail
quota=86000
while [[ $# -gt 0 && $1 != "--" ]]; do
    case $1 in
        --quota) quota=$2; shift 2 ;;
        *) echo "usage: $0 [--quota US] -- COMMAND ..." >&2; exit 2 ;;
    esac
done
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "usage: $0 [--quota US] -- COMMAND ..." >&2; exit 2; }

name=danube-slow-$$
if [[ -d /sys/fs/cgroup/cpu && ! -f /sys/fs/cgroup/cgroup.controllers ]]; then  # cgroup v1
    group=/sys/fs/cgroup/cpu/$name
    mkdir "$group"
    echo 100000 > "$group/cpu.cfs_period_us"
    echo "$quota" > "$group/cpu.cfs_quota_us"
else                                                                             # cgroup v2
    group=/sys/fs/cgroup/$name
    mkdir "$group"
    echo "$quota 100000" > "$group/cpu.max"
fi
echo $$ > "$group/cgroup.procs"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
echo "slow machine: $quota us of CPU per 100 ms ($group), AVX2 kernels" >&2
exec "$@"
