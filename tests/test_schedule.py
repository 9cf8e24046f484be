"""NeMo schedule names on megatron-core's OptimizerParamScheduler, against the closed form."""

from __future__ import annotations

import math

import pytest
import torch

from danube.config.schema import OptimConfig, SchedConfig
from danube.training.engine import build_scheduler

LR, MIN_LR, WARMUP, CONSTANT, STEPS = 2e-4, 1e-5, 10, 20, 100


def expected(name: str, k: int) -> float:
    """Learning rate of update k (1-based)."""
    if k <= WARMUP:
        return LR * k / WARMUP
    if name == "Constant":
        return LR
    end = STEPS - CONSTANT
    if k > end:
        return MIN_LR
    ratio = (k - WARMUP) / (end - WARMUP)
    coeff = 0.5 * (1 + math.cos(math.pi * ratio)) if name == "CosineAnnealing" else 1 - ratio
    return MIN_LR + (LR - MIN_LR) * coeff


@pytest.mark.parametrize("name", ["CosineAnnealing", "LinearAnnealing", "Constant"])
def test_schedule_matches_closed_form(name):
    optim = OptimConfig(lr=LR, weight_decay=0.1, sched=SchedConfig(
        name=name, warmup_steps=WARMUP, constant_steps=CONSTANT, min_lr=MIN_LR))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(optim, STEPS, optimizer)
    for k in range(1, STEPS + 1):
        scheduler.step(increment=1)  # as train_step does before update k
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected(name, k), rel=1e-9), k
        assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_sched_max_steps_decouples_the_horizon_from_the_run_length():
    optim = OptimConfig(lr=LR, sched=SchedConfig(warmup_steps=0, min_lr=0.0, max_steps=1000))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(optim, 10, optimizer)  # a 10-step run of a 1000-step schedule
    scheduler.step(increment=500)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2, rel=1e-9)


def test_on_resume_the_config_wins_over_the_checkpoint():
    """A run resumed with a new lr/min_lr/warmup follows the new schedule from the saved step
    (megatron's default would silently keep the checkpoint's values), and the launch can list
    what changed."""
    from danube.config.compose import config_changes

    def scheduler(lr, min_lr):
        optim = OptimConfig(lr=lr, weight_decay=0.1, sched=SchedConfig(
            name="CosineAnnealing", warmup_steps=WARMUP, constant_steps=CONSTANT, min_lr=min_lr))
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return build_scheduler(optim, STEPS, optimizer), optimizer

    old, _ = scheduler(LR, MIN_LR)
    for _ in range(30):
        old.step(increment=1)
    new, optimizer = scheduler(LR / 2, MIN_LR / 2)
    new.load_state_dict(old.state_dict())
    new.step(increment=1)  # update 31
    assert new.max_lr == LR / 2 and new.num_steps == 31
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected("CosineAnnealing", 31) / 2)

    before = "# precision note\nmodel:\n  optim:\n    lr: 0.0002\n    betas: [0.9, 0.95]\n"
    after = "model:\n  optim:\n    lr: 0.0001\n    betas: [0.9, 0.95]\n  seed: 3\n"
    assert config_changes(before, after) == ["model.optim.lr: 0.0002 -> 0.0001",
                                             "model.seed: (absent) -> 3"]
    assert config_changes(after, after) == []


def test_a_ramp_whose_tokens_per_step_change_gets_a_token_counted_schedule():
    """Stages of 512, 1024 and 2048 tokens per step (4 steps each): the schedule advances by
    each step's tokens, warmup ends after 2 steps' tokens and the cosine reaches min_lr at the
    ramp's last token, so the LR of step k is the closed form at the tokens trained so far.
    With one number of tokens per step the schedule stays step-counted."""
    from danube.config.compose import compose_pretrain_config
    from danube.config.derived import schedule_counts_tokens, step_tokens, tokens_after

    stages = ("[{tokens:2048,encoder_seq_length:32,global_batch_size:16},"
              "{tokens:4096,encoder_seq_length:64,global_batch_size:16},"
              "{tokens:8192,encoder_seq_length:128,global_batch_size:16}]")
    model = compose_pretrain_config("danube_tiny", [
        f"model.seq_length_stages={stages}", "model.encoder_seq_length=128"]).model
    assert schedule_counts_tokens(model)
    assert [step_tokens(model, k) for k in range(1, 13)] == [512] * 4 + [1024] * 4 + [2048] * 4
    optim = OptimConfig(lr=LR, weight_decay=0.1, sched=SchedConfig(
        name="CosineAnnealing", warmup_steps=2, constant_steps=0, min_lr=MIN_LR))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(optim, 12, optimizer, lambda s: tokens_after(model, s))
    warmup, end, seen = 1024, 4 * 512 + 4 * 1024 + 4 * 2048, 0
    for k in range(1, 13):
        seen += step_tokens(model, k)
        scheduler.step(increment=step_tokens(model, k))
        want = LR * seen / warmup if seen <= warmup else MIN_LR + (LR - MIN_LR) * 0.5 * (
            1 + math.cos(math.pi * (seen - warmup) / (end - warmup)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9), k
    assert seen == end and optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR)
    same = compose_pretrain_config("danube_tiny", [
        "model.seq_length_stages=[{tokens:2048,encoder_seq_length:32,global_batch_size:32},"
        "{tokens:2048,encoder_seq_length:64,global_batch_size:16}]",
        "model.encoder_seq_length=64"]).model
    assert not schedule_counts_tokens(same)
