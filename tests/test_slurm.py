"""The project's sbatch script on a real SLURM (Debian's slurmctld/slurmd/munge 22.05),
started by the test: a stop signal to the job's tasks -> every rank saves -> exit 75 -> the
script requeues the job -> it reruns under the same id, resumes and finishes, with the losses
of an uninterrupted run. Skipped, saying why, where the SLURM packages are missing (`make
setup-test` installs them when it runs as root with apt-get)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    DP2_DISTRIBUTED_STEPS,
    ROOT,
    dp2_distributed_args,
    free_port,
    train_losses,
)
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"SLURM not installed ({', '.join(missing_binaries())} missing): "
           "apt-get install slurmctld slurmd slurm-client munge")


def test_sbatch_script_saves_on_a_signal_requeues_and_resumes(tmp_path, init_checkpoint,
                                                             dp2_distributed_straight):
    """2 tasks (gloo), the distributed optimizer, 30 steps; USR1 after 3 logged steps. The
    uninterrupted reference is the same run under torchrun (a shared fixture)."""
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        args = dp2_distributed_args(tmp_path, init_checkpoint)
        venv_bin = str(Path(os.sys.executable).parent)
        env = {**cluster.env, "PATH": f"{venv_bin}:{os.environ['PATH']}",
               "CONFIG": "danube_tiny", "MASTER_PORT": str(free_port()),
               "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "OMP_NUM_THREADS"):
            env.pop(key, None)
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
             "--gpus-per-node=2", f"--output={tmp_path}/slurm-%j.out",
             "launchers/slurm/pretrain.sbatch", *args, "exp_manager.name=slurm"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        job = submitted.stdout.strip().split(";")[0]
        metrics, log = tmp_path / "slurm" / "metrics.jsonl", tmp_path / f"slurm-{job}.out"
        deadline = time.time() + 240
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
                log.read_text()[-3000:] if log.is_file() else cluster.job(job)
            time.sleep(0.2)
        # what --signal=USR1@300 does before a time limit: USR1 to the job's tasks
        subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)
        info = cluster.wait(job, timeout=400)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-4000:])
        stopped = [line for line in text.splitlines() if "stopped after step" in line]
        assert len(stopped) == 1 and "SIGUSR1" in stopped[0], text[-4000:]
        step = int(stopped[0].split("stopped after step ")[1].split()[0])
        assert f"requeueing job {job} (restart 1)" in text
        assert f"(step {step})" in text.split(f"requeueing job {job}")[1]  # resumed there
        assert 3 <= step < DP2_DISTRIBUTED_STEPS
        assert not list(ROOT.glob(".danube-stopped-*"))  # the script's stop marker is gone
        straight = train_losses(dp2_distributed_straight)
        assert list(straight) == list(range(1, DP2_DISTRIBUTED_STEPS + 1))
        assert train_losses(tmp_path / "slurm") == straight
    finally:
        cluster.stop()
