"""Norms for the local (non-TE) layer spec.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism, and `torch.nn.RMSNorm`
ignores `params_dtype`. These take megatron's norm arguments, create the weight in
`config.params_dtype`, and mark it `sequence_parallel` so that `finalize_model_grads`
all-reduces its gradient across the tensor-parallel group when activations are split
along the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF Llama/Mistral do (exact parity)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` with megatron's constructor and a sequence-parallel mark."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


def norm_class(normalization: str) -> type:
    """The norm module for megatron-core's `normalization` name."""
    return RMSNorm if normalization == "RMSNorm" else LayerNorm
