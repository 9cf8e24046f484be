"""The configs we ship, not only danube_tiny, through what a long run lives on: a few steps,
a stop signal mid-run, exit 75 within a bound, the relaunch resumes, and the losses equal an
uninterrupted run's step for step.

Each config is shrunk to a CPU size by overrides of its size keys only (layers, width, heads,
sequence, batch, steps, data and tokenizer paths); its own loader workers, async_save,
precision, optimizer (the distributed optimizer) and ramp shape (two stages standing for its
four) are kept. What cannot run on a CPU is overridden with the reason beside it.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import (
    DPO_LAUNCHER,
    LAUNCHER,
    SFT_LAUNCHER,
    Launch,
    run_pretrain,
    train_losses,
)

STOP_BOUND_S = 30

SMALL_BODY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.num_query_groups=2",
    "trainer.devices=1", "trainer.num_nodes=1",  # one CPU process for the configs' GPUs
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
    "model.optim.sched.warmup_steps=2",  # the configs' 2000/20 exceed a shrunk run
]
# Pretraining configs read indexed data and a Llama-2 tokenizer from /data: the embedded
# corpus and tokenizer stand in. FP8 needs Transformer Engine on a Hopper GPU (preflight
# refuses it on a CPU), so danube_1.8b trains in its bf16 fallback here.
PRETRAIN_DATA = ["model.tokenizer.library=embedded", "model.tokenizer.model=null",
                 "model.data.data_prefix=[embedded:prose]", "model.fp8=false",
                 "trainer.limit_val_batches=1", "trainer.val_check_interval=10",
                 "exp_manager.checkpoint_callback_params.every_n_train_steps=4"]
SHRUNK = {
    # the ramp's shape kept: a stage at half length and twice the batch, then full length
    "danube_1.8b": ["model.encoder_seq_length=64", "model.max_position_embeddings=64",
                    "model.window_size=48",
                    "model.seq_length_stages=[{tokens:4096,encoder_seq_length:32,"
                    "global_batch_size:16,micro_batch_size:8},{tokens:6144,"
                    "encoder_seq_length:64,global_batch_size:8,micro_batch_size:4}]"],
    # one length throughout, no window
    "danube2_1.8b": ["model.encoder_seq_length=64", "model.max_position_embeddings=64",
                     "model.global_batch_size=8", "model.micro_batch_size=4",
                     "trainer.max_steps=20"],
    "tinyllama_1.1b": ["model.encoder_seq_length=64", "model.max_position_embeddings=64",
                       "model.global_batch_size=8", "model.micro_batch_size=4",
                       "trainer.max_steps=20"],
}


def _steps_then_stop(overrides, launcher, at_step: int) -> None:
    launch = Launch(overrides, launcher)
    try:
        launch.wait_for(f"step {at_step}/", timeout=240)
        since = time.monotonic()
        launch.signal(signal.SIGTERM)
        code = launch.wait(STOP_BOUND_S)
        assert code == 75, (code, launch.stdout()[-2000:], launch.stderr()[-3000:])
        assert time.monotonic() - since < STOP_BOUND_S
        assert "stopped after step" in launch.stdout()
    finally:
        launch.wait(0)


def _stop_resume_equals_straight(tmp_path, launcher, overrides, at_step: int):
    straight = [*overrides, f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=straight"]
    run_pretrain(straight, launcher=launcher, timeout=600)
    stopped = [*overrides, f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=stopped"]
    _steps_then_stop(stopped, launcher, at_step)
    resumed = run_pretrain(stopped, launcher=launcher, timeout=600)
    assert "resumed from" in resumed.stdout
    want = train_losses(tmp_path / "straight")
    assert train_losses(tmp_path / "stopped") == want
    return want


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_a_shipped_pretraining_config_stops_and_resumes_exactly(tmp_path, name):
    """The config's loader (2 workers), async_save, precision (bf16-mixed), distributed
    optimizer and ramp, shrunk: stopped by SIGTERM mid-run (exit 75 within the bound), the
    same command resumes and the run's losses equal an uninterrupted run's."""
    overrides = ["--config-name", name, *SMALL_BODY, *PRETRAIN_DATA, *SHRUNK[name]]
    losses = _stop_resume_equals_straight(tmp_path, LAUNCHER, overrides, at_step=6)
    assert len(losses) == 20 and list(losses) == list(range(1, 21))


FINETUNE = [
    "model.encoder_seq_length=64", "model.global_batch_size=8", "model.micro_batch_size=2",
    "trainer.max_epochs=null", "trainer.max_steps=12", "trainer.val_check_interval=6",
    "trainer.limit_val_batches=1",
    "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
]


# The fine-tuning configs' own data paths (/data/...) replaced by the embedded sets; their
# architecture comes from the starting checkpoint (the small one), so no size overrides.
FINETUNE_DATA = {
    "danube_1.8b_chat_sft": (SFT_LAUNCHER, [
        "model.data.train_ds.file_path=embedded:chat",
        "model.data.validation_ds.file_path=embedded:chat_validation"]),
    "danube_1.8b_chat_dpo": (DPO_LAUNCHER, [
        "model.data.data_prefix.train=embedded:preference",
        "model.data.data_prefix.validation=embedded:preference_validation"]),
}


@pytest.mark.parametrize("name", sorted(FINETUNE_DATA))
def test_a_shipped_finetuning_config_stops_and_resumes_exactly(tmp_path, init_checkpoint, name):
    """danube_1.8b_chat_sft (packed, distributed optimizer, bf16-mixed) and
    danube_1.8b_chat_dpo (LoRA r=4 with its dropout, precomputed reference log-probs,
    distributed optimizer, bf16-mixed), from a small checkpoint on the embedded data."""
    launcher, data = FINETUNE_DATA[name]
    overrides = ["--config-name", name, *SMALL_BODY, *FINETUNE,
                 f"model.restore_from_path={init_checkpoint}", *data]
    overrides = [o for o in overrides if not o.startswith(("model.num_", "model.hidden",
                                                           "model.ffn"))]
    losses = _stop_resume_equals_straight(tmp_path, launcher, overrides, at_step=5)
    assert list(losses) == list(range(1, 13))
