"""Merging LoRA adapters into their base weight (export); plain torch, no megatron-core."""

from __future__ import annotations

import torch


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32 and returned in W's dtype. Megatron stores a
    TP-sharded tensor's shards concatenated along its split axis, so the full W, B and A
    line up row for row (fc1's per-shard [gate; up] order included)."""
    merged = weight.float() + scale * (lora_b.float() @ lora_a.float())
    return merged.to(weight.dtype)
