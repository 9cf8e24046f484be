"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

The backend the layer spec picks when Transformer Engine is absent (CPU, or a GPU without
TE). megatron-core's own `DotProductAttention` materialises the [b, np, sq, sk] score matrix,
casts it to fp32 for the softmax and builds the window mask on every call; SDPA runs a fused
flash kernel on CPU and GPU alike. Same constructor and forward contract as
`DotProductAttention`, so it drops into `SelfAttentionSubmodules.core_attention`.

Sliding window: megatron's `window_size=(left, right)` is inclusive on both sides, so query i
sees keys i-left..i+right. `danube.model.builder` maps HF's `sliding_window=W` (W keys,
the query included) to (W-1, 0).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


@lru_cache(maxsize=8)
def sliding_window_keep_mask(sq: int, sk: int, left: int, right: int, device: str) -> torch.Tensor:
    """[sq, sk] bool, True where query i may attend key j (queries are the last sq of sk)."""
    q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)  # [sq, 1]
    k_pos = torch.arange(sk, device=device).unsqueeze(0)  # [1, sk]
    offset = q_pos - k_pos
    return (offset <= left) & (offset >= -right)


@lru_cache(maxsize=8)
def _additive_window_mask(sq: int, sk: int, left: int, right: int, device: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """The same mask as 0 / -inf in the compute dtype: SDPA's CPU flash kernel runs ~15%
    faster with an additive mask than with a boolean one. Every row keeps its own key."""
    keep = sliding_window_keep_mask(sq, sk, left, right, device)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's `DotProductAttention` (same arguments, same shapes)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention")
        tp_size = (
            pg_collection.tp.size()
            if pg_collection is not None
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.grouped = self.groups_per_partition != self.heads_per_partition  # GQA
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        self.attn_mask_type = attn_mask_type
        self.window_size = (
            config.window_size
            if is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number)
            else None
        )

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: Optional[torch.Tensor],  # [b, 1, sq, sk] bool, True = masked out
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias need the TE backend")
        sq, b, _, _ = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        mask = self._mask(sq, sk, attention_mask, attn_mask_type, q)
        dropout_p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                scale=self.softmax_scale, enable_gqa=self.grouped,
            )  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, hp]

    def _mask(self, sq, sk, attention_mask, attn_mask_type, q) -> Optional[torch.Tensor]:
        """Additive mask (0 = attend, -inf = not); None means plain causal (`is_causal`).

        `no_mask` is what megatron's inference engine passes once the prompt is in the KV
        cache: the sq new queries are the last of sk keys and every earlier key is in the
        past, so it is the same bottom-right causal mask (narrowed by the window)."""
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"attention mask type {mask_type} needs the TE backend")
        if self.window_size is None and attention_mask is None and sq == sk:
            return None
        # Causal is the window (sk, 0); a sliding window narrows it to (left, 0).
        left, right = self.window_size if self.window_size is not None else (sk, 0)
        mask = _additive_window_mask(sq, sk, left, right, str(q.device), q.dtype)  # [sq, sk]
        if attention_mask is not None:  # [b, 1, sq, sk], True = masked out
            mask = mask.masked_fill(attention_mask, float("-inf"))
        return mask
