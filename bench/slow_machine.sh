#!/usr/bin/env bash
# Run a command as if on the slow 2-core machines the quick start is sized for (danube_tiny
# at ~1,300 tokens/s in fp32): one busy loop per core in a cgroup of weight 1024-SHARE, the
# command (and everything it starts) in a cgroup of weight SHARE, so that each core gives the
# command about SHARE/1024 of its time while both run at once, as slower cores would; ATen and
# oneDNN are held to AVX2 kernels. Needs root (a writable cgroup file system).
#
#   bench/slow_machine.sh [--share N] -- COMMAND ...
#
# --share: the command's weight out of 1024 (default 340: on the 2-core AVX512-BF16 EPYC of
# 2026-12-06, 3,550-3,835 tokens/s alone, it gave 1,130-1,280 in a 30-step run and 1,009-1,533
# over the demo's 100 steps). Calibrate on another
# machine by the tokens/s a short pretraining prints:
#   bench/slow_machine.sh -- .venv/bin/python launchers/pretrain.py trainer.precision=32 \
#       trainer.max_steps=30 exp_manager.name=calibrate
# The demo runs fp32 by default, which is also what `auto` picks on those machines.
# (A CPU quota, cpu.cfs_quota_us, is the worse stand-in: the command's threads run at full
# speed, then all wait, and spinning threads burn the quota; the suite took 27 min under it
# against 15.6 here.)
set -euo pipefail
usage() { echo "usage: $0 [--share N] -- COMMAND ..." >&2; exit 2; }
share=340
while [[ $# -gt 0 && $1 != "--" ]]; do
    case $1 in
        --share) share=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || usage

name=danube-slow-$$
if [[ -d /sys/fs/cgroup/cpu && ! -f /sys/fs/cgroup/cgroup.controllers ]]; then  # cgroup v1
    root=/sys/fs/cgroup/cpu file=cpu.shares scale=1024
else                                                                             # cgroup v2
    root=/sys/fs/cgroup file=cpu.weight scale=100
fi
mkdir "$root/$name" "$root/$name-load"
echo $((share * scale / 1024)) > "$root/$name/$file"
echo $(((1024 - share) * scale / 1024)) > "$root/$name-load/$file"
loads=()
for _ in $(seq "$(nproc)"); do
    (echo "$BASHPID" > "$root/$name-load/cgroup.procs"; exec python3 -c "while True: pass") &
    loads+=($!)
done
cleanup() {
    kill "${loads[@]}" 2>/dev/null || true
    wait "${loads[@]}" 2>/dev/null || true
    for _ in $(seq 50); do  # a group whose last task just exited may be busy for a moment
        rmdir "$root/$name-load" "$root/$name" 2>/dev/null || true
        [[ -d $root/$name-load || -d $root/$name ]] || break
        sleep 0.1
    done
}
trap cleanup EXIT
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
echo "slow machine: weight $share of 1024 against $(nproc) busy loops, AVX2 kernels" >&2
set +e
(echo "$BASHPID" > "$root/$name/cgroup.procs"; exec "$@")
status=$?
set -e
exit $status
