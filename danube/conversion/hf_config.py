"""Hugging Face `config.json` <-> our ModelConfig, for LlamaForCausalLM / MistralForCausalLM.

Reads configs written by transformers 4.x (top-level `rope_theta`, as the published Danube
checkpoints have) and 5.x (`rope_parameters`); writes both forms, so either version loads the
export. Anything we do not implement (RoPE scaling, biases, MoE, other activations) is a
problem reported before any file is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from danube.config.schema import ModelConfig

ARCHITECTURES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama"}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: give a Hugging Face model directory")
    return json.loads(path.read_text())


def rope_theta(cfg: dict) -> float:
    """transformers 5.x keeps it in `rope_parameters`, 4.x at the top level."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _rope_type(cfg: dict) -> Optional[str]:
    """A RoPE variant other than plain RoPE, from either generation's keys, or None."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kinds = (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type"))
    return next((k for k in kinds if k not in (None, "default")), None)


def hf_config_problems(cfg: dict) -> List[str]:
    """What in this config.json our Llama/Mistral mapping does not implement."""
    problems = []
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        problems.append(f"architecture {arch!r} is not supported; only "
                        f"{' and '.join(ARCHITECTURES)} convert")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r}: only SwiGLU (silu) MLPs convert")
    if _rope_type(cfg) is not None:
        problems.append(f"RoPE scaling type {_rope_type(cfg)!r} is not implemented (only plain "
                        "RoPE with rope_theta)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true: biases are not supported (Llama/Mistral have none)")
    moe = [k for k in _MOE_KEYS if cfg.get(k)]
    if moe:
        problems.append(f"mixture-of-experts models ({', '.join(moe)}) are not supported")
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                     cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} is not supported")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if not isinstance(cfg.get(key), int):
            problems.append(f"config.json lacks an integer {key}")
    return problems


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def vocab_divisor(vocab_size: int) -> int:
    """The largest of 128, 64, ..., 1 dividing the vocabulary: no padded rows, so logits and
    weights stay exactly the Hugging Face ones."""
    return next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if vocab_size % d == 0)


def model_overrides_from_hf(cfg: dict) -> dict:
    """ModelConfig fields of the architecture described by a (checked) config.json."""
    heads = cfg["num_attention_heads"]
    dim = head_dim(cfg)
    window = cfg.get("sliding_window") if ARCHITECTURES.get(cfg["architectures"][0]) == "mistral" \
        else None
    context = cfg.get("max_position_embeddings", 4096)
    return {
        "num_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "kv_channels": None if dim * heads == cfg["hidden_size"] else dim,
        "window_size": window,
        "max_position_embeddings": context,
        "encoder_seq_length": min(context, 4096),
        "position_embedding_type": "rope",
        "rotary_base": rope_theta(cfg),
        "normalization": "rmsnorm",
        "layernorm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "activation": "fast-swiglu",
        "bias": False,
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        "vocab_size": cfg["vocab_size"],  # may exceed the tokenizer's: rows kept as they are
        "make_vocab_size_divisible_by": vocab_divisor(cfg["vocab_size"]),
        "init_method_std": float(cfg.get("initializer_range", 0.02)),
    }


def export_problems(model: ModelConfig) -> List[str]:
    """What in our model has no Llama/Mistral counterpart."""
    problems = []
    if model.normalization != "rmsnorm":
        problems.append(f"normalization={model.normalization}: Llama/Mistral use rmsnorm")
    if model.activation not in ("swiglu", "fast-swiglu"):
        problems.append(f"activation={model.activation}: Llama/Mistral use SwiGLU")
    if model.bias:
        problems.append("bias=true: Llama/Mistral have no biases")
    if model.position_embedding_type != "rope" or model.rotary_percentage != 1.0:
        problems.append("Llama/Mistral need full RoPE (position_embedding_type=rope, "
                        "rotary_percentage=1.0)")
    return problems


def hf_config_from_model(model: ModelConfig, vocab_size: int, token_ids: dict,
                         dtype: str) -> dict:
    """config.json for our model: MistralForCausalLM when it has a sliding window."""
    mistral = model.window_size is not None
    heads = model.num_attention_heads
    theta = float(model.rotary_base)
    cfg = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.kv_channels or model.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.layernorm_epsilon,
        "rope_theta": theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # 5.x
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "use_cache": True,
        "torch_dtype": dtype,  # 4.x
        "dtype": dtype,  # 5.x
        **token_ids,
    }
    if mistral:
        cfg["sliding_window"] = model.window_size  # HF's meaning, which is also ours
    else:
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return cfg
