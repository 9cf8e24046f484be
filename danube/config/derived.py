"""Quantities derived from a config: world and batch arithmetic, the data blend, the padded
vocabulary. Pure functions of the config, used by the checks (`validate`, `preflight`) and by
the code that builds the run alike; no checks here.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Tuple

from danube.config.schema import DataConfig, ModelConfig, PretrainConfig

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SOURCES = ("prose", "code")
# The built-in SFT set and its preference pairs (danube.data.embedded_chat): config name ->
# its file in the cache.
EMBEDDED_CHAT = {"embedded:chat": "train.jsonl", "embedded:chat_validation": "validation.jsonl",
                 "embedded:preference": "preference_train.jsonl",
                 "embedded:preference_validation": "preference_validation.jsonl"}
# model.dpo.preference_loss choices (danube.training.dpo defines them).
PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "hinge", "robust")

# Keys whose change makes a checkpoint's weights unusable (preflight compares them before
# loading one).
ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "activation", "bias", "position_embedding_type",
    "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
)
# Everything a checkpoint fixes about its model: the keys above plus what shapes its numerics
# and vocabulary; a fine-tuning run takes them all from the checkpoint it starts from.
ARCHITECTURE_FIELDS = ARCHITECTURE_KEYS + (
    "window_size", "rotary_base", "rotary_percentage", "layernorm_epsilon", "vocab_size",
    "max_position_embeddings", "init_method_std",
)


def stage_steps(model: ModelConfig) -> List[int]:
    """Steps of each seq_length_stages entry: its tokens over its tokens per step, rounded up
    (0 for a malformed stage, which validation reports)."""
    steps = []
    for stage in model.seq_length_stages:
        per_step = stage.global_batch_size * stage.encoder_seq_length
        steps.append(-(-stage.tokens // per_step) if per_step > 0 and stage.tokens > 0 else 0)
    return steps


def with_stage_steps(cfg):
    """trainer.max_steps=-1 with seq_length_stages: every stage's steps (what config.yaml then
    records); otherwise cfg unchanged."""
    from dataclasses import replace

    if not cfg.model.seq_length_stages or cfg.trainer.max_steps != -1:
        return cfg
    return replace(cfg, trainer=replace(cfg.trainer, max_steps=sum(stage_steps(cfg.model))))


def schedule_counts_tokens(model: ModelConfig) -> bool:
    """The LR schedule counts tokens, not steps: seq_length_stages whose tokens per step
    differ (with one number of tokens per step, counting steps is the same schedule)."""
    per_step = {s.encoder_seq_length * s.global_batch_size for s in model.seq_length_stages}
    return len(per_step) > 1


def step_tokens(model: ModelConfig, step: int) -> int:
    """Tokens per step of the stage that trains step `step` (1-based) of the ramp; steps past
    the last stage count as the last stage's."""
    return tokens_after(model, step) - tokens_after(model, step - 1)


def tokens_after(model: ModelConfig, steps: int) -> int:
    """Tokens the ramp has trained after `steps` steps: where a step-denominated schedule key
    (warmup_steps, max_steps, constant_steps) falls on the token-counted schedule. Steps past
    the last stage count as the last stage's."""
    total, left = 0, steps
    for stage, count in zip(model.seq_length_stages, stage_steps(model)):
        taken = min(left, count)
        total, left = total + taken * stage.encoder_seq_length * stage.global_batch_size, \
            left - taken
    last = model.seq_length_stages[-1]
    return total + left * last.encoder_seq_length * last.global_batch_size


def schedule_default_horizon(cfg) -> int:
    """Steps the LR schedule decays over unless model.optim.sched.max_steps says: the whole
    ramp with seq_length_stages, else trainer.max_steps."""
    return sum(stage_steps(cfg.model)) if cfg.model.seq_length_stages else cfg.trainer.max_steps


def normalized_precision(precision: str) -> str:
    """'32' or 'bf16' (bf16 and bf16-mixed mean the same: bf16 compute, fp32 main weights).
    `auto` depends on the machine: resolve it first (`runtime.resolve_precision`)."""
    if str(precision) == "auto":
        raise ValueError("trainer.precision=auto must be resolved for this machine first")
    return "32" if str(precision) in ("32", "32-true") else "bf16"


def world_size(cfg: PretrainConfig) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def data_parallel_size(model: ModelConfig, world: int) -> int:
    model_parallel = (
        model.tensor_model_parallel_size
        * model.pipeline_model_parallel_size
        * model.context_parallel_size
    )
    return max(world // max(model_parallel, 1), 1)


def num_microbatches(model: ModelConfig, world: int) -> int:
    """Gradient-accumulation steps per optimizer step on each data-parallel rank."""
    return model.global_batch_size // (model.micro_batch_size * data_parallel_size(model, world))


def parse_blend(prefixes) -> Tuple[Optional[List[str]], Optional[List[float]], List[str]]:
    """NeMo `data_prefix` list -> (paths, weights or None, problems)."""
    if not isinstance(prefixes, (list, tuple)) or not prefixes:
        return None, None, ["must be a non-empty list"]
    if len(prefixes) == 1:
        if not isinstance(prefixes[0], str):
            return None, None, [f"a single entry must be a path prefix, got {prefixes[0]!r}"]
        return [prefixes[0]], None, []
    if len(prefixes) % 2:
        return None, None, ["a blend alternates weight, prefix: it needs an even length"]
    weights, paths = list(prefixes[0::2]), list(prefixes[1::2])
    problems = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or w <= 0:
            problems.append(f"weight {w!r} must be a positive number")
    for p in paths:
        if not isinstance(p, str):
            problems.append(f"prefix {p!r} must be a string")
    if problems:
        return None, None, problems
    return paths, [float(w) for w in weights], []


def blend_paths(data: DataConfig) -> List[str]:
    """Every prefix the config names, in all splits (empty if malformed)."""
    prefix = data.data_prefix
    groups = list(prefix.values()) if isinstance(prefix, dict) else [prefix]
    paths: List[str] = []
    for group in groups:
        if group is not None:
            parsed, _, _ = parse_blend(group)
            paths += parsed or []
    return paths


def stage_blends(model: ModelConfig) -> List[Tuple[str, list]]:
    """(config key, blend) of every seq_length_stages entry with its own data_prefix."""
    return [(f"model.seq_length_stages[{i}].data_prefix", stage.data_prefix)
            for i, stage in enumerate(model.seq_length_stages) if stage.data_prefix is not None]


def padded_vocab_size(tokenizer_vocab: int, model: ModelConfig) -> int:
    """Rows of the embedding and the LM head: the model's vocabulary (`model.vocab_size`, else
    the tokenizer's) rounded up to a multiple of `make_vocab_size_divisible_by`. It depends on
    the config alone, never on TP (megatron-LM pads to divisor x TP, so a TP=1 checkpoint of
    vocab 32000 would not load at TP=4): `validate` requires TP to divide the divisor."""
    rows = model.vocab_size or tokenizer_vocab
    multiple = model.make_vocab_size_divisible_by
    return -(-rows // multiple) * multiple


def parse_max_time(value: Optional[str]) -> Optional[float]:
    """NeMo's `DD:HH:MM:SS` (shorter forms count from the right: `HH:MM:SS`, `MM:SS`) ->
    seconds; None stays None. ValueError on anything else."""
    if value is None or str(value).strip() in ("", "null", "None"):
        return None
    parts = str(value).strip().split(":")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{value!r} is not DD:HH:MM:SS")
    seconds = 0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += int(part) * unit
    return float(seconds)


def mean_keys_per_query(seq_length: int, window: Optional[int]) -> float:
    """Keys a query attends to on average under causal attention within a window of
    `window` keys (the query included; None = no window): (s+1)/2 without one."""
    w = min(window or seq_length, seq_length)
    return (w * (w + 1) / 2 + (seq_length - w) * w) / seq_length


FLOP_CONVENTIONS = ("window", "megatron", "full")


def training_flops_per_token(m: ModelConfig, vocab: int, seq_length: int,
                             attention: str = "window") -> float:
    """Training (forward + backward) FLOPs per token: 6 x the weights a token touches (layers
    and LM head, not the embedding lookup) + 12 x layers x heads x head_dim x keys per query
    for QK^T and AV. The keys, by `attention` convention:
      window    causal within the window: the work a kernel that skips masked blocks does
                (Danube-1.8B 11.25 GFLOP at 2048, 13.14 at 16384, ../shared/notes/
                gpu-slurm-ngc.md A2)
      megatron  Megatron-LM's `num_floating_point_operations` (0.16): causal, half the
                sequence (`seq_length / 2  # causal mask`), the window ignored
      full      every key of the sequence (PaLM's and MPT's MFU; 12.00 and 22.57)."""
    heads = m.num_attention_heads
    head_dim = m.kv_channels or m.hidden_size // heads
    groups = m.num_query_groups or heads
    qkv = m.hidden_size * head_dim * (heads + 2 * groups)
    proj = head_dim * heads * m.hidden_size
    mlp = (3 if m.activation in ("swiglu", "fast-swiglu") else 2) * m.hidden_size \
        * m.ffn_hidden_size
    dense = m.num_layers * (qkv + proj + mlp) + m.hidden_size * vocab
    keys = {"window": lambda: mean_keys_per_query(seq_length, m.window_size),
            "megatron": lambda: seq_length / 2, "full": lambda: seq_length}[attention]()
    return 6 * dense + 12 * m.num_layers * heads * head_dim * keys
