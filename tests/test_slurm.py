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

from tests.conftest import QUIET, ROOT, SMALL_MODEL, free_port, run_pretrain, train_losses
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"SLURM not installed ({', '.join(missing_binaries())} missing): "
           "apt-get install slurmctld slurmd slurm-client munge")


def test_sbatch_script_saves_on_a_signal_requeues_and_resumes(tmp_path):
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        args = [*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=40",
                "model.optim.sched.max_steps=40", "model.optim.sched.warmup_steps=2",
                "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
                f"exp_manager.exp_dir={tmp_path}"]
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
        assert 3 <= step < 40
        assert not list(ROOT.glob(".danube-stopped-*"))  # the script's stop marker is gone
        run_pretrain([*args, "exp_manager.name=straight"], nproc=2)
        resumed, straight = train_losses(tmp_path / "slurm"), train_losses(tmp_path / "straight")
        assert list(straight) == list(range(1, 41)) and resumed == straight
    finally:
        cluster.stop()
