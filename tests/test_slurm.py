"""The project's sbatch scripts on a real SLURM (Debian's slurmctld/slurmd/munge 22.05),
started by the test: a stop signal to the job's tasks (sent by hand, or by SLURM preempting
the job for a higher-priority partition's) -> every rank saves -> exit 75 -> the job is
requeued -> it reruns under the same id, resumes and finishes, with the losses of an
uninterrupted run. Skipped, saying why, where the SLURM packages are missing (`make
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
    run_pretrain,
    train_losses,
)
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.skipif(
    bool(missing_binaries()),
    reason=f"SLURM not installed ({', '.join(missing_binaries())} missing): "
           "apt-get install slurmctld slurmd slurm-client munge")


def _submit(cluster: SlurmCluster, tmp_path: Path, script: str, args: list, config: str,
            sbatch: tuple = (), env_extra: dict = None):
    """sbatch the project's script as a user would (2 tasks, the fake GPUs); the job id."""
    venv_bin = str(Path(os.sys.executable).parent)
    env = {**cluster.env, "PATH": f"{venv_bin}:{os.environ['PATH']}", "CONFIG": config,
           "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "OMP_NUM_THREADS"):
        env.pop(key, None)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
         "--gpus-per-node=2", f"--output={tmp_path}/slurm-%j.out", *sbatch, script, *args,
         "exp_manager.name=slurm"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def _wait_for_steps(cluster: SlurmCluster, job: str, tmp_path: Path, steps: int) -> None:
    metrics, log = tmp_path / "slurm" / "metrics.jsonl", tmp_path / f"slurm-{job}.out"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.is_file() else cluster.job(job)
        time.sleep(0.2)
    raise TimeoutError(f"job {job}: fewer than {steps} steps logged in 240 s")


def _stopped_requeued_and_finished(cluster, job: str, tmp_path: Path, signal_name: str,
                                   last_step: int, first_step: int = 3) -> int:
    """The job saved at one step for `signal_name`, was requeued once (same id, log appended),
    resumed at that step and completed; that step."""
    info = cluster.wait(job, timeout=400)
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-4000:])
    stopped = [line for line in text.splitlines() if "stopped after step" in line]
    assert len(stopped) == 1 and signal_name in stopped[0], text[-4000:]
    step = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert f"requeueing job {job} (requeue 1 of at most 20)" in text
    assert f"(step {step})" in text.split(f"requeueing job {job}")[1]  # resumed there
    assert first_step <= step < last_step
    assert not list(ROOT.glob(".danube-stopped-*"))  # the script's stop marker is gone
    assert not (ROOT / f".danube-requeues-{job}").exists()  # nor its requeue count
    return step


def test_sbatch_script_saves_on_a_signal_requeues_and_resumes(tmp_path, init_checkpoint,
                                                             dp2_distributed_straight):
    """pretrain.sbatch: 2 tasks (gloo), the distributed optimizer, 30 steps; USR1 (what
    `--signal=USR1@300` sends before a time limit) after 3 logged steps; the script requeues
    on exit code 75. The uninterrupted reference is the same run under torchrun (a shared
    fixture)."""
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        job = _submit(cluster, tmp_path, "launchers/slurm/pretrain.sbatch",
                      dp2_distributed_args(tmp_path, init_checkpoint), "danube_tiny")
        _wait_for_steps(cluster, job, tmp_path, 3)
        subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)
        _stopped_requeued_and_finished(cluster, job, tmp_path, "SIGUSR1", DP2_DISTRIBUTED_STEPS)
        straight = train_losses(dp2_distributed_straight)
        assert list(straight) == list(range(1, DP2_DISTRIBUTED_STEPS + 1))
        assert train_losses(tmp_path / "slurm") == straight
    finally:
        cluster.stop()


SFT_STEPS = 30


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_preempted_finetuning_job_saves_and_is_requeued(tmp_path, init_checkpoint, stage):
    """sft.sbatch / dpo.sbatch (STAGE=sft|dpo through pretrain.sbatch), 2 tasks, 30 steps
    (DPO: the embedded preference pairs, reference log-probs on the fly), preempted for real:
    a job submitted to the higher-PriorityTier partition (PreemptMode=REQUEUE) takes the node,
    SLURM sends SIGTERM to the running job, every rank saves the same step and exits 75, the
    job is requeued once (SLURM's preemption requeue and the script's requeue on 75 do not
    double up), reruns after the urgent job, resumes and finishes with the losses of an
    uninterrupted run (launched directly, the same layout)."""
    from tests.conftest import run_dpo, run_sft

    args = [f"model.restore_from_path={init_checkpoint}", "model.encoder_seq_length=64",
            "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.max_epochs=null",
            f"trainer.max_steps={SFT_STEPS}", f"model.optim.sched.max_steps={SFT_STEPS}",
            "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
            "trainer.limit_test_batches=0", "trainer.precision=32",
            "exp_manager.create_tensorboard_logger=false", "model.optim.sched.warmup_steps=1",
            "model.optim.lr=3e-3", f"exp_manager.exp_dir={tmp_path}",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
            f"exp_manager.checkpoint_callback_params.save_top_k={SFT_STEPS}"]
    if stage == "sft":
        run_sft([*args, "exp_manager.name=straight"], nproc=2)
    else:
        args.append("model.data.data_prefix.validation=null")
        run_dpo([*args, "exp_manager.name=straight"], nproc=2)
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        job = _submit(cluster, tmp_path, f"launchers/slurm/{stage}.sbatch", args,
                      f"danube_tiny_{stage}")
        _wait_for_steps(cluster, job, tmp_path, 3)
        urgent = subprocess.run(
            ["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--gpus-per-node=2",
             f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 1"],
            env=cluster.env, capture_output=True, text=True, check=True).stdout.strip()
        _stopped_requeued_and_finished(cluster, job, tmp_path, "SIGTERM", SFT_STEPS)
        assert cluster.job(urgent)["JobState"] == "COMPLETED"
        straight = train_losses(tmp_path / "straight")
        assert list(straight) == list(range(1, SFT_STEPS + 1))
        assert train_losses(tmp_path / "slurm") == straight
    finally:
        cluster.stop()


TIME_LIMIT_STEPS = 1000


def test_a_job_at_its_time_limit_saves_and_is_requeued(tmp_path, init_checkpoint):
    """pretrain.sbatch submitted with `--time=1` (one minute) and its own `--signal=USR1@300`:
    the warning is due from the start, and slurmctld sends it at its next time-limit check
    (every ~30 s), while the 1000-step run (~80 s here) is still going (or still starting: held by
    danube.startup_signals). Every rank saves, exits 75, the script requeues the job; while the
    rerun waits, the test gives it a longer limit (`scontrol update TimeLimit=10`), and it
    resumes and finishes. Its losses are an uninterrupted run's through 20 steps past the stop:
    the reference runs only that far (trainer.max_steps lowered, the schedule's horizon and so
    the data order kept), not the 1000 steps again (it cost a third of this test, the most of
    any one test on a slow CPU)."""
    args = [*dp2_distributed_args(tmp_path, init_checkpoint)]
    args = [a for a in args if "max_steps" not in a and "save_top_k" not in a
            and "every_n_train_steps" not in a]
    args += [f"model.optim.sched.max_steps={TIME_LIMIT_STEPS}",
             "trainer.log_every_n_steps=10",
             "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
             "exp_manager.checkpoint_callback_params.save_top_k=2"]
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        job = _submit(cluster, tmp_path, "launchers/slurm/pretrain.sbatch",
                      [*args, f"trainer.max_steps={TIME_LIMIT_STEPS}"], "danube_tiny",
                      sbatch=("--time=1",))
        deadline = time.time() + 120
        while cluster.job(job).get("Restarts") != "1":
            assert time.time() < deadline and cluster.job(job).get("JobState") in (
                "PENDING", "RUNNING", "COMPLETING"), cluster.job(job)
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env=cluster.env,
                       check=True, capture_output=True)
        stop = _stopped_requeued_and_finished(cluster, job, tmp_path, "SIGUSR1",
                                              TIME_LIMIT_STEPS, first_step=1)
        assert cluster.job(job)["TimeLimit"] == "00:10:00"
    finally:
        cluster.stop()
    slurm = train_losses(tmp_path / "slurm")
    assert list(slurm) == list(range(10, TIME_LIMIT_STEPS + 1, 10))
    # the first logged step 20 or more past the stop
    compared = min(-(-(stop + 20) // 10) * 10, TIME_LIMIT_STEPS)
    run_pretrain([*args, f"trainer.max_steps={compared}", "exp_manager.name=straight"], nproc=2)
    straight = train_losses(tmp_path / "straight")
    assert list(straight) == list(range(10, compared + 1, 10))
    assert {step: loss for step, loss in slurm.items() if step <= compared} == straight


def test_the_script_says_why_it_stops_requeueing(tmp_path, init_checkpoint):
    """MAX_RESTARTS=0: a run stopped by trainer.max_time (exit 75, checkpoint saved) is not
    requeued, and the job's log says why and how to go on; the job ends FAILED with 75."""
    args = [a for a in dp2_distributed_args(tmp_path, init_checkpoint)
            if "max_steps" not in a] + ["trainer.max_steps=100000",
                                        "model.optim.sched.max_steps=100000",
                                        "trainer.max_time=00:00:00:15"]
    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        job = _submit(cluster, tmp_path, "launchers/slurm/pretrain.sbatch", args, "danube_tiny",
                      env_extra={"MAX_RESTARTS": "0"})
        info = cluster.wait(job, timeout=300)
        text = (tmp_path / f"slurm-{job}.out").read_text()
        assert info["Restarts"] == "0" and info["ExitCode"].startswith("75"), (info, text[-3000:])
        assert "stopped after step" in text
        assert f"not requeueing job {job}: it stopped to be resumed (exit 75), but this " \
               "script already requeued it 0 times (MAX_RESTARTS=0)" in text
        assert not (ROOT / f".danube-requeues-{job}").exists()
    finally:
        cluster.stop()
