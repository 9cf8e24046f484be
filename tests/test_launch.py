"""Launch environments: torchrun, SLURM, plain python; the shipped scripts are well-formed."""

from __future__ import annotations

import os
import subprocess
import sys

from danube.runtime import launch_info
from tests.conftest import QUIET, ROOT, SMALL_MODEL, free_port, train_losses


def test_launch_info_reads_torchrun_then_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_info().launcher == "single" and launch_info().world_size == 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = launch_info()
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 16, "slurm")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_info().launcher == "torchrun"  # torchrun inside an allocation wins


def test_a_slurm_task_trains(tmp_path):
    """What srun gives each task (here one task), with the sbatch script's rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [sys.executable, "launchers/pretrain.py", *SMALL_MODEL, *QUIET, "trainer.max_steps=2",
         "model.optim.sched.warmup_steps=1", f"exp_manager.exp_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(train_losses(tmp_path / "danube_tiny")) == [1, 2]


def test_shell_scripts_parse():
    for script in ("launchers/slurm/pretrain.sbatch", ".ci/run"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
