"""End-to-end training through launchers/pretrain.py: learning, exact resume, divergence,
stopping on a signal or a time budget. (Accumulation: micro-batch 1 x 8 vs 4 x 2 is
tests/test_parallel.py's pp2 layout.)"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import (
    QUIET,
    SMALL_MODEL,
    blend_with_a_small_source,
    read_metrics,
    run_pretrain,
    train_losses,
)


def test_danube_tiny_learns_and_logs(tmp_path):
    """The embedded default, shortened: loss falls, logs and checkpoints land where documented."""
    run_pretrain(["trainer.max_steps=20", "trainer.val_check_interval=10",
                  "trainer.log_every_n_steps=1",
                  "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
                  "model.optim.sched.warmup_steps=5",
                  "exp_manager.checkpoint_callback_params.every_n_train_steps=5",
                  "exp_manager.checkpoint_callback_params.save_top_k=3",
                  "model.downstream_eval.tasks=[arc_easy]", "model.downstream_eval.limit=20",
                  f"exp_manager.exp_dir={tmp_path}"])
    exp = tmp_path / "danube_tiny"
    records = read_metrics(exp)
    _downstream_equals_evaluating_the_checkpoint(records, exp)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for record in train:
        keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"}
        assert keys <= set(record)
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    last5 = sum(r["loss"] for r in train[-5:]) / 5
    assert last5 < train[0]["loss"] - 2.0, [round(r["loss"], 3) for r in train]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[0]["val_ppl"] == pytest.approx(2.718281828 ** val[0]["val_loss"], rel=1e-6)
    assert any("test_loss" in r for r in records)
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (exp / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000015", "step_00000020"]
    # a checkpoint records its own step's validation loss or none (step 15 comes after the
    # validation at 10: an older loss would misrank it for save_top_k / monitor val_loss)
    metas = {p.name: json.loads((p / "danube_checkpoint.json").read_text())
             for p in (exp / "checkpoints").iterdir()}
    assert metas["step_00000015"]["val_loss"] is None
    assert metas["step_00000020"]["val_loss"] == pytest.approx(val[1]["val_loss"])
    assert (exp / "checkpoints" / "step_00000020" / "config.yaml").is_file()
    assert (exp / "checkpoints" / "step_00000020" / "tokenizer" / "tokenizer.json").is_file()
    assert (exp / "config.yaml").is_file()


def _downstream_equals_evaluating_the_checkpoint(records, exp):
    """model.downstream_eval scored at steps 10 and 20, and step 20's numbers are what
    eval/evaluate.py gives on the step-20 checkpoint with the same limit."""
    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EvalSettings, headline, score
    from danube.inference.model import open_checkpoint

    scored = [r for r in records if "downstream/arc_easy/acc_norm" in r]
    assert [r["step"] for r in scored] == [10, 20]
    with open_checkpoint(exp / "checkpoints" / "step_00000020") as im:
        again = headline(score(DanubeLM(im), EvalSettings(tasks=["arc_easy"], limit=20)))
    assert {f"downstream/{k}": v for k, v in again.items()} == {
        k: v for k, v in scored[1].items() if k.startswith("downstream/")}


RAMP = ["model.encoder_seq_length=128", "model.max_position_embeddings=128",
        "model.seq_length_stages=[{tokens:1024,encoder_seq_length:32,global_batch_size:16},"
        "{tokens:1024,encoder_seq_length:64,global_batch_size:8},"
        "{tokens:1024,encoder_seq_length:128,global_batch_size:4}]"]


def test_resume_equals_uninterrupted(tmp_path):
    """A sequence-length ramp (32 -> 64 -> 128 tokens, 512 tokens per step, two steps each)
    over a blend with a source read for several epochs, run straight, and resumed from its
    checkpoint at a stage boundary (step 2), stopped inside a stage (step 3), then resumed to
    the end: the same
    losses step for step, bit for bit, in bf16 (which also covers megatron's
    Float16Module-before-DDP requirement for checkpoints; fp32 resume through the same loop:
    tests/test_sft.py and test_dpo.py), each step at its stage's shape. Running the finished
    run again changes nothing; resuming it with other stages (which reorders the data) is
    refused and leaves the run as it was."""
    precision = "bf16-mixed"
    common = [*SMALL_MODEL, *QUIET, *RAMP, "model.optim.sched.warmup_steps=2",
              f"trainer.precision={precision}",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
              "exp_manager.checkpoint_callback_params.save_top_k=3",
              blend_with_a_small_source(tmp_path), f"exp_manager.exp_dir={tmp_path}"]
    run_pretrain([*common, "trainer.max_steps=-1", "exp_manager.name=straight"])
    # the straight run's checkpoint at the first stage boundary starts the stopped-and-resumed
    # one (what a run stopped there by trainer.max_steps=2 saves: the same steps, computed
    # the same way), which stops inside the second stage, then goes to the end
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    (tmp_path / "resumed" / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in read_metrics(tmp_path / "straight") if r["step"] <= 2))
    inside = run_pretrain([*common, "trainer.max_steps=3", "exp_manager.name=resumed"])
    assert "(step 2)" in inside.stdout
    last = run_pretrain([*common, "trainer.max_steps=-1", "exp_manager.name=resumed"])
    assert "resumed from" in last.stdout and "(step 3)" in last.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == [
        1, 2, 3, 4, 5, 6]  # steps 3-6 logged by the resumed runs, once each
    assert "settings changed since that checkpoint" in last.stdout
    assert "trainer.max_steps: 3 -> 6" in last.stdout
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert list(straight) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    records = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    assert [r["seq_length"] for r in records] == [32, 32, 64, 64, 128, 128]
    assert [r["consumed_samples"] for r in records] == [16, 32, 40, 48, 52, 56]
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000006"
    plan = json.loads((ckpt / "danube_checkpoint.json").read_text())["data_plan"]
    assert [(s["encoder_seq_length"], s["steps"]) for s in plan["stages"]] == [
        (32, 2), (64, 2), (128, 2)]
    assert [src["epochs"] > 1 for src in plan["stages"][0]["sources"]] == [False, True]
    stamp = (ckpt / "danube_checkpoint.json").read_text()
    again = run_pretrain([*common, "trainer.max_steps=-1", "exp_manager.name=straight"])
    assert "resumed from" in again.stdout and "(step 6)" in again.stdout
    assert (ckpt / "danube_checkpoint.json").read_text() == stamp
    assert train_losses(tmp_path / "straight") == straight
    saved_config = (tmp_path / "straight" / "config.yaml").read_text()
    checkpoints = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    other = [o.replace("{tokens:1024,encoder_seq_length:64", "{tokens:2048,encoder_seq_length:64")
             for o in common]
    refused = run_pretrain([*other, "trainer.max_steps=-1", "exp_manager.name=straight"],
                           check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "would read the training data in a different order" in refused.stderr
    assert "stages[1].steps: 2 -> 4" in refused.stderr
    assert "resume_accept_data_plan_change" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == \
        checkpoints
    assert (tmp_path / "straight" / "config.yaml").read_text() == saved_config
    assert train_losses(tmp_path / "straight") == straight


def test_divergence_stops_before_saving(tmp_path):
    """trainer.nan_policy=stop: the step whose gradient norm is NaN ends the run (exit code 3,
    the last good checkpoint named) and is never checkpointed; caught on a step that is not
    logged (its loss never reaches the host: the gradient norm watches)."""
    quiet = [o.replace("log_every_n_steps=1", "log_every_n_steps=10") for o in QUIET]
    diverging = run_pretrain([*SMALL_MODEL, *quiet, "trainer.precision=32",
                              "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
                              f"exp_manager.exp_dir={tmp_path}", "trainer.max_steps=4",
                              "model.optim.lr=1e30", "model.optim.sched.warmup_steps=0",
                              "exp_manager.name=nan"], check=False)
    assert diverging.returncode == 3, diverging.stderr[-2000:]
    assert "the run diverged" in diverging.stderr and "step_00000001" in diverging.stderr
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == [
        "step_00000001"]


def test_a_skipped_update_leaves_the_weights_and_the_run_goes_on(tmp_path, monkeypatch):
    """trainer.nan_policy=skip (bf16): the step whose loss is made NaN (fault injection,
    DANUBE_INJECT_NAN_AT_STEPS) applies no update: its checkpoint holds the weights of the
    step before, bit for bit; the next step updates again and the run finishes (fp32's
    refusal: tests/test_validation.py). Continued with two NaN steps in a row and
    trainer.max_consecutive_skips=2, it stops as a divergence does (exit 3), the second
    skipped step not checkpointed."""
    import math

    import torch

    from tests.conftest import saved_weights, train_records

    monkeypatch.setenv("DANUBE_INJECT_NAN_AT_STEPS", "2")
    args = [*SMALL_MODEL, *QUIET, "trainer.precision=bf16-mixed", "trainer.max_steps=3",
            "trainer.nan_policy=skip", "model.optim.sched.warmup_steps=1",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
            "exp_manager.checkpoint_callback_params.save_top_k=3",
            f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=skip"]
    run = run_pretrain(args)
    assert "step 2: non-finite gradients" in run.stdout and "update skipped" in run.stdout
    records = train_records(tmp_path / "skip")
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[3]["loss"])
    weights = {step: saved_weights(tmp_path / "skip" / "checkpoints" / f"step_{step:08d}")
               for step in (1, 2, 3)}
    assert all(torch.equal(weights[2][k], weights[1][k]) for k in weights[1])
    assert any(not torch.equal(weights[3][k], weights[2][k]) for k in weights[2])
    monkeypatch.setenv("DANUBE_INJECT_NAN_AT_STEPS", "5,6")
    bounded = run_pretrain([*args, "trainer.max_steps=8", "trainer.max_consecutive_skips=2"],
                           check=False)
    assert bounded.returncode == 3, bounded.stderr[-2000:]
    assert "step 5: non-finite gradients" in bounded.stdout
    assert "step 6: 2 steps in a row had non-finite gradients" in bounded.stderr
    assert sorted(p.name for p in (tmp_path / "skip" / "checkpoints").iterdir()) == [
        "step_00000003", "step_00000004", "step_00000005"]


def test_max_time_saves_and_exits_75(tmp_path):
    """trainer.max_time: the run stops at a step boundary before the budget, saves that step and
    exits 75 (what the sbatch script requeues on), its steps contiguous. A stop signal takes
    the same path: tests/test_slurm.py sends one through a real SLURM and checks the requeued
    run resumes to the losses of an uninterrupted one."""
    args = [*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=400",
            "model.optim.sched.max_steps=400", "model.optim.sched.warmup_steps=2",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
            f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=stop",
            "trainer.max_time=00:00:00:04"]
    stopped = run_pretrain(args, check=False)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "stopped after step" in stopped.stdout and "trainer.max_time" in stopped.stdout
    steps = [r["step"] for r in read_metrics(tmp_path / "stop") if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and 1 <= steps[-1] < 400
    assert [p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()] == [
        f"step_{steps[-1]:08d}"]


def test_a_stop_signal_during_start_up_saves_and_exits_75(tmp_path):
    """SIGUSR1 one second into a launch (a cold one: Python is still importing torch and
    megatron-core) is not the signal's default death: `danube.startup_signals` holds it for
    the loop, which stops after its first step, saves it and exits 75 (what the sbatch
    script requeues on). Without it the process dies of SIGUSR1 (-10)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import LAUNCHER, ROOT

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    launch = subprocess.Popen(
        [sys.executable, str(LAUNCHER), *SMALL_MODEL, *QUIET, "trainer.precision=32",
         "trainer.max_steps=50", "model.optim.sched.warmup_steps=2",
         f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=early"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    launch.send_signal(signal.SIGUSR1)
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 75, (launch.returncode, err[-3000:])
    assert "training danube_tiny" in out  # the signal came before training started
    assert out.index("training danube_tiny") < out.index("stopped after step 1 for a stop "
                                                        "signal (SIGUSR1)")
    assert [p.name for p in (tmp_path / "early" / "checkpoints").iterdir()] == [
        "step_00000001"]


def test_a_ramp_that_changes_tokens_per_step_has_a_token_counted_schedule(tmp_path):
    """32 x 16 then 64 x 16 tokens per step (512 then 1024): the LR follows the tokens trained
    (warmup over step 1's 512 tokens, cosine to min_lr at the ramp's 3,072nd), and a resume at
    the stage boundary gives the straight run's losses and learning rates bit for bit."""
    import math

    from tests.conftest import train_records

    common = [*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=-1",
              "model.seq_length_stages=[{tokens:1024,encoder_seq_length:32,global_batch_size:16},"
              "{tokens:2048,encoder_seq_length:64,global_batch_size:16}]",
              "model.optim.lr=3e-3", "model.optim.sched.min_lr=1e-4",
              "model.optim.sched.warmup_steps=1",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
              f"exp_manager.exp_dir={tmp_path}"]
    run_pretrain([*common, "exp_manager.name=straight"])
    straight = train_records(tmp_path / "straight")
    assert [straight[k]["seq_length"] for k in (1, 2, 3, 4)] == [32, 32, 64, 64]
    seen = {1: 512, 2: 1024, 3: 2048, 4: 3072}
    for k, tokens in seen.items():
        want = 3e-3 * tokens / 512 if tokens <= 512 else 1e-4 + (3e-3 - 1e-4) * 0.5 * (
            1 + math.cos(math.pi * (tokens - 512) / (3072 - 512)))
        assert straight[k]["lr"] == pytest.approx(want, rel=1e-6), k
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    run = run_pretrain([*common, "exp_manager.name=resumed"])
    assert "(step 2)" in run.stdout
    resumed = train_records(tmp_path / "resumed")
    assert list(resumed) == [3, 4]
    for k in (3, 4):
        assert (resumed[k]["loss"], resumed[k]["lr"]) == (straight[k]["loss"], straight[k]["lr"])
