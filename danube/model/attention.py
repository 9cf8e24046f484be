"""Core attention without Transformer Engine: torch SDPA (CPU) and FlexAttention (GPU).

`SDPAttention` is what the layer spec picks on a CPU. megatron-core's own
`DotProductAttention` materialises the [b, np, sq, sk] score matrix, casts it to fp32 for the
softmax and builds the window mask on every call; SDPA runs a fused flash kernel instead. A
sliding window is a dense additive [sq, sk] mask there: fine on a CPU, not at 16k tokens on a
GPU (a 2 GiB transient, and every masked block still computed).

`FlexAttention` is the GPU path without TE: torch's FlexAttention with a block mask (causal,
the window, packed documents), compiled, so the blocks outside the window are skipped; GQA
without expanding K/V; plain causal SDPA (flash) when the window covers the sequence.

Both have `DotProductAttention`'s constructor and forward contract, so they drop into
`SelfAttentionSubmodules.core_attention`, and both take packed sequences in megatron's THD
layout (`packed_seq_params.qkv_format == "thd"`: q/k/v [t, heads, d], documents delimited by
`cu_seqlens_q`), the layout TE's fused attention takes too.

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


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t] index of the packed document each position belongs to (`cu_seqlens` [n+1]: the
    documents' start offsets and the total length, megatron/TE's THD convention)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def is_thd(packed_seq_params) -> bool:
    return packed_seq_params is not None and packed_seq_params.qkv_format == "thd"


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
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs the TE backend")
        if packed_seq_params is not None and not is_thd(packed_seq_params):
            raise NotImplementedError(
                f"packed sequences in the {packed_seq_params.qkv_format!r} layout: only thd")
        thd = is_thd(packed_seq_params)
        if thd:  # [t, np, hn]: one row of packed documents
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        sq, b, _, _ = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        context = self._attend(q, k, v, attention_mask, attn_mask_type,
                               packed_seq_params if thd else None)  # [b, np, sq, hn]
        context = context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, hp]
        return context.squeeze(1) if thd else context  # THD: [t, hp]

    def _attend(self, q, k, v, attention_mask, attn_mask_type, packed_seq_params):
        """[b, np, sq, hn] contexts of q [b, np, sq, hn], k/v [b, ng, sk, hn]."""
        if packed_seq_params is not None:  # each document alone: sum(n^2), not t^2, work
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            return torch.cat([self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None,
                                           attn_mask_type, None)
                              for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)
        mask = self._mask(q.shape[2], k.shape[2], attention_mask, attn_mask_type, q)
        dropout_p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else nullcontext()
        with rng:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                scale=self.softmax_scale, enable_gqa=self.grouped,
            )

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


FLEX_BLOCK = 128  # FlexAttention's default block size (BlockMask granularity)


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled it runs a math fallback that
    materialises the [s, s] scores (10-30x slower backward, pytorch/pytorch#182611)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _eager_flex_attention(*args, **kwargs):
    """FlexAttention uncompiled (CPU: forward only, for equivalence tests; no backward)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch")
        return flex_attention(*args, **kwargs)


def window_mask_mod(left: int, docs: Optional[torch.Tensor] = None):
    """FlexAttention mask_mod: causal, at most `left` keys back (megatron's inclusive left
    window), and with `docs` ([t] document ids) within the query's own document."""

    def causal_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= left)

    if docs is None:
        return causal_window

    def causal_window_in_document(b, h, q_idx, kv_idx):
        return causal_window(b, h, q_idx, kv_idx) & (docs[q_idx] == docs[kv_idx])

    return causal_window_in_document


@lru_cache(maxsize=8)
def window_block_mask(s: int, left: int, device: str):
    """The [s, s] causal window as a BlockMask (128 x 128 blocks; those wholly outside the
    window are never computed), cached per (sequence length, window): one per ramp stage."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(window_mask_mod(left), B=None, H=None, Q_LEN=s, KV_LEN=s,
                             device=device)


class FlexAttention(SDPAttention):
    """Sliding-window (and packed-document) attention on FlexAttention; the GPU backend
    without Transformer Engine. Falls back to `SDPAttention` where FlexAttention buys
    nothing: the window covers the sequence (plain causal SDPA, a flash kernel), the
    inference engine's KV-cached steps (queries fewer than keys), explicit dense masks, and
    lengths that are not whole 128-token blocks (inference prompts: compiled for fixed
    shapes, FlexAttention would recompile for each; training lengths are whole blocks)."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.dropout_p > 0:
            raise ValueError("FlexAttention has no attention dropout: set "
                             "model.attention_dropout=0 or model.attention_backend=sdpa")

    def _attend(self, q, k, v, attention_mask, attn_mask_type, packed_seq_params):
        sq, sk = q.shape[2], k.shape[2]
        left = self.window_size[0] if self.window_size is not None else sk
        if attention_mask is not None or sq != sk or sq % FLEX_BLOCK:
            return super()._attend(q, k, v, attention_mask, attn_mask_type, packed_seq_params)
        if packed_seq_params is None and left >= sk - 1:  # the window covers the sequence
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  scale=self.softmax_scale,
                                                  enable_gqa=self.grouped)
        if packed_seq_params is None:
            block_mask = window_block_mask(sq, left, str(q.device))
        else:
            block_mask = document_block_mask(packed_seq_params, sq, left)
        flex = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention
        return flex(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                    enable_gqa=self.grouped)  # [b, np, sq, hn]


_LAST_PACKED: list = [None, None, None]  # [PackedSeqParams, (t, left), BlockMask]


def document_block_mask(packed_seq_params, t: int, left: int):
    """The block mask of one packed micro-batch, built once for all its layers: they get the
    same PackedSeqParams object (held here, so its identity cannot be reused by another)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if _LAST_PACKED[0] is not packed_seq_params or _LAST_PACKED[1] != (t, left):
        docs = document_ids(packed_seq_params.cu_seqlens_q, t)  # [t]
        mask = create_block_mask(window_mask_mod(left, docs), B=None, H=None, Q_LEN=t,
                                 KV_LEN=t, device=str(docs.device))
        _LAST_PACKED[:] = [packed_seq_params, (t, left), mask]
    return _LAST_PACKED[2]
