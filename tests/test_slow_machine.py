"""bench/slow_machine.sh, the stand-in for the slow 2-core machines the quick start is timed
on: the command runs in its own weighted cgroup with AVX2 kernels, the busy loops competing
with it end with it, and its exit status comes back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "slow_machine.sh"


def _cgroups_writable() -> bool:
    v1 = Path("/sys/fs/cgroup/cpu")
    base = v1 if v1.is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists() \
        else Path("/sys/fs/cgroup")
    return os.geteuid() == 0 and os.access(base, os.W_OK)


def _busy_loops() -> int:
    out = subprocess.run(["pgrep", "-f", "while True: pass"], capture_output=True, text=True)
    return len(out.stdout.split())


def test_usage_without_a_command():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr


PROBE = """
import os, sys
from pathlib import Path
line = next(l for l in open('/proc/self/cgroup').read().splitlines()
            if l.split(':')[1] in ('cpu', 'cpu,cpuacct', 'cpuacct,cpu', ''))
group = line.split(':')[-1].lstrip('/')
v1 = Path('/sys/fs/cgroup/cpu')
here = v1 / group if v1.is_dir() else Path('/sys/fs/cgroup') / group
weight = here / ('cpu.shares' if v1.is_dir() else 'cpu.weight')
print(os.environ['ATEN_CPU_CAPABILITY'], here, weight.read_text().strip())
sys.exit(7)
"""


@pytest.mark.skipif(not _cgroups_writable(), reason="needs root and a writable cgroup fs")
def test_the_command_runs_weighted_with_avx2_kernels_and_the_load_ends_with_it():
    before = _busy_loops()
    run = subprocess.run(["bash", str(SCRIPT), "--share", "512", "--", sys.executable, "-c",
                          PROBE], capture_output=True, text=True, timeout=60)
    assert run.returncode == 7, run.stderr  # the command's exit status
    kernels, group, weight = run.stdout.split()
    assert kernels == "avx2" and "danube-slow-" in group
    assert weight in ("512", str(512 * 100 // 1024))  # v1 shares, v2 weight
    assert not Path(group).exists() and not Path(group + "-load").exists()  # both removed
    assert _busy_loops() == before
