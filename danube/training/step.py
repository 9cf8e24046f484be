"""One optimizer step and one evaluation pass on megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean loss of one micro-batch. Returning (sum, tokens, ...) lets the schedule
    divide by the token count and the number of micro-batches."""
    losses = output_tensor.float().view(-1)  # [b * s]
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])  # [2]: loss sum, tokens
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(device: torch.device, data_iterator: Iterator, model):
    """megatron-core forward_step_func: one micro-batch through this rank's model chunk.
    With context parallelism each rank keeps its two (load-balanced) sequence chunks."""
    batch = get_batch_on_this_cp_rank(_to_device(next(data_iterator), device))
    output = model(
        batch["tokens"],  # [b, s]
        batch["position_ids"],  # [b, s]
        batch.get("attention_mask"),  # [b, 1, s, s] or None (causal)
        labels=batch["labels"],  # [b, s]
    )  # per-token losses [b, s] on the last stage, activations elsewhere
    return output, partial(loss_func, batch["loss_mask"])


def _reduce_losses(losses: List[dict], device: torch.device) -> float:
    """Token-weighted mean loss over micro-batches, data- and context-parallel ranks, on every
    rank. Only the last pipeline stage (TP rank 0) contributes, so one all-reduce over the
    world both reduces over DP x CP and broadcasts to the other stages."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        for item in losses:
            total += item["lm loss"].to(torch.float64)
    torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def _run_schedule(model: List, micro_batches: List[dict], device: torch.device,
                  forward_only: bool) -> List[dict]:
    """One global batch (this rank's micro-batches) through megatron's schedule for the
    parallel layout (no pipelining, 1F1B, or interleaved); returns the last stage's
    per-micro-batch loss reports. Every model chunk reads the same micro-batches (the
    interleaved schedule pulls from each chunk's iterator)."""
    micro_batch_size, seq_length = micro_batches[0]["tokens"].shape  # [b, s]
    iterators: List[Iterator] = [iter(micro_batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, device),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def train_step(model: List, optimizer, scheduler, micro_batches: List[dict],
               device: torch.device):
    """Forward/backward over this rank's micro-batches, then one optimizer step at the
    scheduler's next learning rate. Returns (loss, lr, grad_norm)."""
    scheduler.step(increment=1)
    lr = optimizer.param_groups[0]["lr"]
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(model, micro_batches, device, forward_only=False)
    _, grad_norm, _ = optimizer.step()  # bf16/fp32: no loss scaling, never skipped
    return _reduce_losses(losses, device), lr, grad_norm


@torch.no_grad()
def evaluate(model: List, batches: List[List[dict]], device: torch.device) -> Optional[float]:
    """Mean loss per trained token over global batches (each: this rank's micro-batches),
    forward only."""
    for chunk in model:
        chunk.eval()
    losses: List[dict] = []
    for micro_batches in batches:
        losses += _run_schedule(model, micro_batches, device, forward_only=True)
    for chunk in model:
        chunk.train()
    return _reduce_losses(losses, device)
