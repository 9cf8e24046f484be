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
from typing import Dict

import torch

LAYER_PREFIX = "decoder.layers"
GLOBALS = {  # megatron -> HF, outside the layers
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LAYER_NORMS = {  # megatron (within a layer) -> HF (within a layer)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}
LAYER_KEYS = (*LAYER_NORMS, "self_attention.linear_qkv.weight",
              "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc2.weight")
HF_LAYER_KEYS = (*LAYER_NORMS.values(), "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.groups


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


def hf_to_mcore_layer(hf: Dict[str, torch.Tensor], g: Geometry) -> Dict[str, torch.Tensor]:
    """One layer's HF tensors (keys relative to model.layers.N) -> megatron's (relative to
    decoder.layers.N)."""
    out = {mc: hf[name] for mc, name in LAYER_NORMS.items()}
    out["self_attention.linear_qkv.weight"] = interleave_qkv(
        hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"],
        hf["self_attn.v_proj.weight"], g)
    out["self_attention.linear_proj.weight"] = hf["self_attn.o_proj.weight"]
    out["mlp.linear_fc1.weight"] = torch.cat(
        [hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0)  # [2*ffn, h]
    out["mlp.linear_fc2.weight"] = hf["mlp.down_proj.weight"]
    return out


def mcore_to_hf_layer(mc: Dict[str, torch.Tensor], g: Geometry) -> Dict[str, torch.Tensor]:
    """The inverse of `hf_to_mcore_layer`."""
    out = {name: mc[key] for key, name in LAYER_NORMS.items()}
    q, k, v = split_qkv(mc["self_attention.linear_qkv.weight"], g)
    out["self_attn.q_proj.weight"], out["self_attn.k_proj.weight"] = q, k
    out["self_attn.v_proj.weight"] = v
    out["self_attn.o_proj.weight"] = mc["self_attention.linear_proj.weight"]
    gate, up = torch.chunk(mc["mlp.linear_fc1.weight"], 2, dim=0)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = gate, up
    out["mlp.down_proj.weight"] = mc["mlp.linear_fc2.weight"]
    return out
