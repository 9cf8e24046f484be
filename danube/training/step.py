"""One optimizer step and one evaluation pass on megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


TOKEN_LOSS_METRICS = ("lm loss",)


def token_loss(raw: dict, batch: dict, output_tensor: torch.Tensor):
    """Token-mean cross-entropy of one micro-batch (pretraining, SFT). Returning (sum, tokens,
    report) lets the schedule divide by the token count and the number of micro-batches, or,
    with calculate_per_token_loss, by the tokens of the whole global batch.

    A loss function takes (raw, batch, output_tensor): the micro-batch as the recipe made it
    (CPU; writable, e.g. to keep values for later), the same on the device, and the model's
    per-token losses [b, s]. Its report maps metric names to [sum, count]."""
    losses = output_tensor.float().view(-1)  # [b * s]
    mask = batch["loss_mask"].view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])  # [2]: loss sum, tokens
    return loss_sum, num_tokens, {"lm loss": report}


LossFn = Callable[[dict, dict, torch.Tensor], tuple]


def packed_params(raw: dict, device: torch.device):
    """A packed micro-batch's PackedSeqParams (THD), or None: `cu_seqlens` delimits its
    documents in the flattened [1, b * s] row (`data.sft.collate_rows`)."""
    if "cu_seqlens" not in raw:
        return None
    cu_seqlens = raw["cu_seqlens"]  # [n + 1], CPU: the longest document without a sync
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    on_device = cu_seqlens.to(device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=on_device, cu_seqlens_kv=on_device,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def model_shape(batch: dict) -> tuple:
    """(micro-batch size, sequence length) as the model runs it: a packed micro-batch is one
    row of b * s tokens (THD)."""
    b, s = batch["tokens"].shape
    return (1, b * s) if "cu_seqlens" in batch else (b, s)


def forward_step(device: torch.device, loss_fn: LossFn, data_iterator: Iterator, model):
    """megatron-core forward_step_func: one micro-batch through this rank's model chunk.
    With context parallelism each rank keeps its two (load-balanced) sequence chunks."""
    raw = next(data_iterator)
    packed = packed_params(raw, device)
    batch = _to_device({k: v for k, v in raw.items() if k != "cu_seqlens"}, device)
    if packed is None:
        batch = get_batch_on_this_cp_rank(batch)
    shape = model_shape(raw)
    output = model(
        batch["tokens"].view(shape),  # [b, s]; packed: [1, b * s]
        batch["position_ids"].view(shape),
        batch.get("attention_mask"),  # [b, 1, s, s] or None (causal)
        labels=batch["labels"].view(shape),
        packed_seq_params=packed,
    )  # per-token losses [b, s] ([1, b * s]) on the last stage, activations elsewhere
    return output, partial(loss_fn, raw, batch)


def all_reduced_reports(reports: List[dict], names: Sequence[str],
                        device: torch.device) -> torch.Tensor:
    """Each metric's [sum, count] over micro-batches and data- and context-parallel ranks,
    [len(names), 2] on the device of every rank: no host sync (`report_means` reads it).
    Only the last pipeline stage (TP rank 0) contributes, so one all-reduce over the world
    both reduces over DP x CP and broadcasts to the other stages."""
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        for item in reports:
            for k, name in enumerate(names):
                if name in item:
                    total[k] += item[name].to(device, torch.float64)
    torch.distributed.all_reduce(total)
    return total


def report_means(total: torch.Tensor, names: Sequence[str]) -> Dict[str, float]:
    """name -> sum / count (NaN without a count): reads the device tensor on the host."""
    sums, counts = total.cpu().unbind(1)
    return {name: (float(sums[k] / counts[k]) if counts[k] > 0 else float("nan"))
            for k, name in enumerate(names)}


def reduce_reports(reports: List[dict], names: Sequence[str],
                   device: torch.device) -> Dict[str, float]:
    """Each metric's mean over the global batch, on every rank (host values)."""
    return report_means(all_reduced_reports(reports, names, device), names)


def run_schedule(model: List, micro_batches: List[dict], device: torch.device,
                 forward_only: bool, loss_fn: LossFn = token_loss) -> List[dict]:
    """One global batch (this rank's micro-batches) through megatron's schedule for the
    parallel layout (no pipelining, 1F1B, or interleaved); returns the last stage's
    per-micro-batch loss reports. Every model chunk reads the same micro-batches (the
    interleaved schedule pulls from each chunk's iterator)."""
    micro_batch_size, seq_length = model_shape(micro_batches[0])
    iterators: List[Iterator] = [iter(micro_batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, device, loss_fn),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def train_step(model: List, optimizer, scheduler, micro_batches: List[dict],
               device: torch.device, loss_fn: LossFn = token_loss,
               names: Sequence[str] = TOKEN_LOSS_METRICS, schedule_increment: int = 1):
    """Forward/backward over this rank's micro-batches, then one optimizer step at the
    scheduler's next learning rate. Returns (the metrics' all-reduced [sum, count] on the
    device: `report_means` reads them, lr, grad_norm: a float when gradients are clipped)."""
    scheduler.step(increment=schedule_increment)  # 1, or this step's tokens (a ramp)
    lr = optimizer.param_groups[0]["lr"]
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(model, micro_batches, device, forward_only=False, loss_fn=loss_fn)
    _, grad_norm, _ = optimizer.step()  # bf16/fp32: no loss scaling, never skipped
    return all_reduced_reports(reports, names, device), lr, grad_norm


@torch.no_grad()
def forward_only(model: List, batches: List[List[dict]], device: torch.device,
                 loss_fn: LossFn = token_loss) -> List[dict]:
    """The reports of global batches (each: this rank's micro-batches) run forward only, in
    eval mode."""
    for chunk in model:
        chunk.eval()
    reports: List[dict] = []
    try:
        for micro_batches in batches:
            reports += run_schedule(model, micro_batches, device, forward_only=True,
                                    loss_fn=loss_fn)
    finally:
        for chunk in model:
            chunk.train()
    return reports


def evaluate(model: List, batches: List[List[dict]], device: torch.device,
             loss_fn: LossFn = token_loss,
             names: Sequence[str] = TOKEN_LOSS_METRICS) -> Dict[str, float]:
    """Metrics (name -> mean; pretraining and SFT: "lm loss" per trained token) over global
    batches, forward only."""
    return reduce_reports(forward_only(model, batches, device, loss_fn), names, device)
