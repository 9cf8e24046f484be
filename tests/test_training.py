"""End-to-end training through launchers/pretrain.py: learning, exact resume, divergence,
stopping on a signal or a time budget. (Accumulation: micro-batch 1 x 8 vs 4 x 2 is
tests/test_parallel.py's pp2 layout.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import QUIET, SMALL_MODEL, read_metrics, run_pretrain, train_losses

SHORT_SCHEDULE = ["model.optim.sched.warmup_steps=2", "model.optim.sched.max_steps=8"]


def test_danube_tiny_learns_and_logs(tmp_path):
    """The embedded default, shortened: loss falls, logs and checkpoints land where documented."""
    run_pretrain(["trainer.max_steps=30", "trainer.val_check_interval=15",
                  "trainer.log_every_n_steps=1",
                  "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
                  "model.optim.sched.warmup_steps=5",
                  "exp_manager.checkpoint_callback_params.every_n_train_steps=10",
                  "exp_manager.checkpoint_callback_params.save_top_k=3",
                  "model.downstream_eval.tasks=[arc_easy]", "model.downstream_eval.limit=20",
                  f"exp_manager.exp_dir={tmp_path}"])
    exp = tmp_path / "danube_tiny"
    records = read_metrics(exp)
    _downstream_equals_evaluating_the_checkpoint(records, exp)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    for record in train:
        keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"}
        assert keys <= set(record)
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    last5 = sum(r["loss"] for r in train[-5:]) / 5
    assert last5 < train[0]["loss"] - 2.0, [round(r["loss"], 3) for r in train]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[0]["val_ppl"] == pytest.approx(2.718281828 ** val[0]["val_loss"], rel=1e-6)
    assert any("test_loss" in r for r in records)
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (exp / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000020", "step_00000030"]
    # a checkpoint records its own step's validation loss or none (step 20 comes after the
    # validation at 15: an older loss would misrank it for save_top_k / monitor val_loss)
    metas = {p.name: json.loads((p / "danube_checkpoint.json").read_text())
             for p in (exp / "checkpoints").iterdir()}
    assert metas["step_00000020"]["val_loss"] is None
    assert metas["step_00000030"]["val_loss"] == pytest.approx(val[1]["val_loss"])
    assert (exp / "checkpoints" / "step_00000030" / "config.yaml").is_file()
    assert (exp / "checkpoints" / "step_00000030" / "tokenizer" / "tokenizer.json").is_file()
    assert (exp / "config.yaml").is_file()


def _downstream_equals_evaluating_the_checkpoint(records, exp):
    """model.downstream_eval scored at steps 15 and 30, and step 30's numbers are what
    eval/evaluate.py gives on the step-30 checkpoint with the same limit."""
    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EvalSettings, headline, score
    from danube.inference.model import open_checkpoint

    scored = [r for r in records if "downstream/arc_easy/acc_norm" in r]
    assert [r["step"] for r in scored] == [15, 30]
    with open_checkpoint(exp / "checkpoints" / "step_00000030") as im:
        again = headline(score(DanubeLM(im), EvalSettings(tasks=["arc_easy"], limit=20)))
    assert {f"downstream/{k}": v for k, v in again.items()} == {
        k: v for k, v in scored[1].items() if k.startswith("downstream/")}


def test_resume_equals_uninterrupted(tmp_path):
    """Stop at step 2, resume to 4: the same losses step for step, bit for bit, in bf16 (which
    also covers megatron's Float16Module-before-DDP requirement for checkpoints; fp32 resume
    through the same loop: tests/test_sft.py and test_dpo.py). Running the finished run again
    changes nothing."""
    precision = "bf16-mixed"
    common = [*SMALL_MODEL, *QUIET, *SHORT_SCHEDULE, f"trainer.precision={precision}",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
              f"exp_manager.exp_dir={tmp_path}"]
    run_pretrain([*common, "trainer.max_steps=4", "exp_manager.name=straight"])
    run_pretrain([*common, "trainer.max_steps=2", "exp_manager.name=resumed"])
    second = run_pretrain([*common, "trainer.max_steps=4", "exp_manager.name=resumed"])
    assert "resumed from" in second.stdout and "(step 2)" in second.stdout
    assert "settings changed since that checkpoint" in second.stdout
    assert "trainer.max_steps: 2 -> 4" in second.stdout
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert list(straight) == [1, 2, 3, 4]
    assert resumed == straight
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000004"
    stamp = (ckpt / "danube_checkpoint.json").read_text()
    again = run_pretrain([*common, "trainer.max_steps=4", "exp_manager.name=straight"])
    assert "resumed from" in again.stdout and "(step 4)" in again.stdout
    assert (ckpt / "danube_checkpoint.json").read_text() == stamp
    assert train_losses(tmp_path / "straight") == straight


def test_divergence_stops_before_saving(tmp_path):
    """trainer.nan_policy=stop: the step whose gradient norm is NaN ends the run (exit code 3,
    the last good checkpoint named) and is never checkpointed."""
    diverging = run_pretrain([*SMALL_MODEL, *QUIET, "trainer.precision=32",
                              "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
                              f"exp_manager.exp_dir={tmp_path}", "trainer.max_steps=4",
                              "model.optim.lr=1e30", "model.optim.sched.warmup_steps=0",
                              "exp_manager.name=nan"], check=False)
    assert diverging.returncode == 3, diverging.stderr[-2000:]
    assert "the run diverged" in diverging.stderr and "step_00000001" in diverging.stderr
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == [
        "step_00000001"]


def test_a_signal_or_max_time_saves_and_the_run_resumes(tmp_path):
    """SIGUSR1 mid-run (what SLURM sends before a time limit or preemption): the run stops at
    the next step boundary, saves that step and exits 75. Run again with trainer.max_time: it
    resumes there and stops, saved, before the limit. No step is lost or repeated."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import LAUNCHER, ROOT, free_port

    args = [*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=400",
            "model.optim.sched.max_steps=400", "model.optim.sched.warmup_steps=2",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
            f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=stop"]
    # launched as one SLURM task (srun's variables, the sbatch script's rendezvous): SLURM
    # delivers the USR1 of `--signal=USR1@300` to such tasks
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", SLURM_PROCID="0", SLURM_NTASKS="1",
               SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped after step" in out and "SIGUSR1" in out
    first = sorted(train_losses(tmp_path / "stop"))
    saved = [p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()]
    assert saved == [f"step_{first[-1]:08d}"] and first[-1] < 400

    again = run_pretrain([*args, "trainer.max_time=00:00:00:06"], check=False)
    assert again.returncode == 75, again.stderr[-3000:]
    assert f"(step {first[-1]})" in again.stdout and "trainer.max_time" in again.stdout
    steps = [r["step"] for r in read_metrics(tmp_path / "stop") if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and first[-1] < steps[-1] < 400
    assert (tmp_path / "stop" / "checkpoints" / f"step_{steps[-1]:08d}").is_dir()
