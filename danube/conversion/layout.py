"""Tensor layouts: Hugging Face Llama/Mistral <-> megatron-core GPTModel, one layer at a time.

megatron-core names (as stored in its checkpoints, TP- and PP-independent):
    embedding.word_embeddings.weight                 [vocab, h]
    decoder.layers.N.self_attention.linear_qkv.layer_norm_weight   input RMSNorm [h]
    decoder.layers.N.self_attention.linear_qkv.weight   [ng * (q_per_group + 2) * hd, h]
    decoder.layers.N.self_attention.linear_proj.weight  [h, np * hd]
    decoder.layers.N.mlp.linear_fc1.layer_norm_weight   pre-MLP RMSNorm [h]
    decoder.layers.N.mlp.linear_fc1.weight           [2 * ffn, h] = cat(gate, up)
    decoder.layers.N.mlp.linear_fc2.weight           [h, ffn]
    decoder.final_layernorm.weight                   [h]
    output_layer.weight                              [vocab, h] (absent when tied)
linear_qkv rows are interleaved per query group: for each group, its query heads, then its
key head, then its value head (anchors.md; the usual GQA conversion bug is getting this wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

LAYER_PREFIX = "decoder.layers"
GLOBALS = {  # megatron -> HF, outside the layers
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
DIRECT = {  # megatron (within a layer) -> HF (within a layer), same tensor
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV, FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
LAYER_KEYS = (*DIRECT, QKV, FC1)
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
HF_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
HF_LAYER_KEYS = (*DIRECT.values(), *HF_QKV, *HF_FC1)


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    @classmethod
    def of(cls, model) -> "Geometry":
        """The attention geometry of a ModelConfig (defaults: MHA, hidden / heads)."""
        heads = model.num_attention_heads
        return cls(model.hidden_size, heads, model.num_query_groups or heads,
                   model.kv_channels or model.hidden_size // heads)


def hf_layer_name(layer: int, key: str) -> str:
    return f"model.layers.{layer}.{key}"


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Geometry) -> torch.Tensor:
    """q [np*hd, h], k/v [ng*hd, h] -> megatron's [ng * (q_per_group + 2) * hd, h]."""
    h = q.shape[1]
    q = q.reshape(g.groups, g.per_group * g.head_dim, h)  # [ng, qpg*hd, h]
    k = k.reshape(g.groups, g.head_dim, h)
    v = v.reshape(g.groups, g.head_dim, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, g: Geometry):
    """The inverse of `interleave_qkv`: -> q [np*hd, h], k [ng*hd, h], v [ng*hd, h]."""
    h = qkv.shape[1]
    grouped = qkv.reshape(g.groups, (g.per_group + 2) * g.head_dim, h)
    q, k, v = torch.split(grouped, [g.per_group * g.head_dim, g.head_dim, g.head_dim], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def mcore_to_hf_layer(mc: Dict[str, torch.Tensor], g: Geometry) -> Dict[str, torch.Tensor]:
    """One layer's megatron tensors (keys relative to decoder.layers.N) -> HF's (relative to
    model.layers.N): the inverse of what `hf_chunk` assembles."""
    out = {name: mc[key] for key, name in DIRECT.items()}
    out.update(zip(HF_QKV, split_qkv(mc[QKV], g)))
    out.update(zip(HF_FC1, torch.chunk(mc[FC1], 2, dim=0)))
    return out


def hf_chunk(key: str, offset: Tuple[int, ...], get: Callable[[str], torch.Tensor],
             g: Geometry) -> torch.Tensor:
    """One chunk of a megatron checkpoint tensor (`key` as stored, `offset` of the chunk in
    the global tensor), from the HF tensors `get(name)` returns: what a streaming import writes.
    Per-layer chunks are [1, ...] slices; SwiGLU's fc1 is stored as its gate and up halves."""
    if key in GLOBALS:
        return get(GLOBALS[key])
    relative, layer = key[len(LAYER_PREFIX) + 1:], offset[0]
    if relative in DIRECT:
        return get(hf_layer_name(layer, DIRECT[relative]))
    if relative == QKV:
        return interleave_qkv(*(get(hf_layer_name(layer, name)) for name in HF_QKV), g)
    if relative == FC1:
        return get(hf_layer_name(layer, HF_FC1[0] if offset[1] == 0 else HF_FC1[1]))
    raise KeyError(f"no Hugging Face counterpart for checkpoint tensor {key}")
