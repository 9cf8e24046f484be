"""Norms for the local (non-TE) layer spec.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism, and `torch.nn.RMSNorm`
ignores `params_dtype`. These take megatron's norm arguments, create the weight in
`config.params_dtype` on megatron's device (`param_device`), and mark it `sequence_parallel`
so that `finalize_model_grads` all-reduces its gradient across the tensor-parallel group when
activations are split along the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def param_device(config: TransformerConfig):
    """Where megatron-core creates its weights: the current CUDA device, or the default
    device with `use_cpu_initialization` (its own linears and embeddings do the same). A
    weight made without it lands on the CPU under a GPU model (found by reading: the first
    norm would meet CUDA activations, and torch's AdamW mixed devices)."""
    return None if config.use_cpu_initialization else torch.cuda.current_device()


class RMSNorm(torch.nn.Module):
    """RMSNorm as HF Llama/Mistral compute it: normalized in fp32, cast back to the input's
    dtype, then scaled (exact parity). In fp32 that is one fused `rms_norm`; in bf16 the fp32
    copy is the op's own temporary (autograd keeps the bf16 input and recomputes), not a
    saved fp32 activation."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=param_device(config)))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * _RMSNormHalf.apply(x, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` with megatron's constructor and a sequence-parallel mark."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype,
                         device=param_device(config))
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


class _RMSNormHalf(torch.autograd.Function):
    """rms_norm(x in fp32) cast back to x's dtype, saving only x (bf16) for the backward: the
    plain composition keeps the fp32 upcast and the fp32 normalized tensor alive for autograd
    (two fp32 copies of every norm's input: 2 x 4 bytes x s x b x h per norm, measured below
    in tests), the backward recomputes them from x instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.eps = eps
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x32 = x.detach().float().requires_grad_(True)
            y = F.rms_norm(x32, (x.shape[-1],), eps=ctx.eps)
            (dx,) = torch.autograd.grad(y, x32, grad.float())
        return dx.to(x.dtype), None


def norm_class(normalization: str) -> type:
    """The norm module for megatron-core's `normalization` name."""
    return RMSNorm if normalization == "RMSNorm" else LayerNorm
