"""Pure config checks: no filesystem, no devices. Every shipped config passes on any machine.

`validate(cfg)` collects every problem (key path, what is wrong, the fix) and
`raise_if_problems` raises one `ConfigError` listing them all, before anything is built.
Launch-time checks (files, TE/CUDA, world size) are in `danube.config.preflight`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List

from danube.config.derived import (
    EMBEDDED_PREFIX,
    EMBEDDED_SOURCES,
    PREFERENCE_LOSSES,
    blend_paths,
    data_parallel_size,
    normalized_precision,
    parse_blend,
    schedule_default_horizon,
    stage_blends,
    stage_steps,
    world_size,
)
from danube.config.schema import DPOConfig, ModelConfig, PretrainConfig, SFTConfig
from danube.model_names import LORA_TARGETS

PRECISIONS = ("auto", "32", "bf16", "bf16-mixed")


class ConfigError(ValueError):
    """Every problem of a config, one per line."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the config:\n{lines}")


def raise_if_problems(problems: List[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _check_choice(problems, key, value, choices) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(problems, section, obj, names, minimum=1) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            problems.append(f"{section}.{name}={value} must be >= {minimum}")


def _check_trainer(cfg: PretrainConfig, problems: List[str]) -> None:
    t = cfg.trainer
    _check_choice(problems, "trainer.precision", str(t.precision), PRECISIONS + ("32-true",))
    _check_choice(problems, "trainer.accelerator", t.accelerator, ("auto", "gpu", "cpu"))
    _check_positive(problems, "trainer", t, ["devices", "num_nodes", "val_check_interval",
                                             "log_every_n_steps"])
    by_epochs = getattr(t, "max_epochs", None) is not None
    _check_positive(problems, "trainer", t, ["limit_val_batches", "limit_test_batches"],
                    minimum=0)
    if t.max_steps < 0 and not (by_epochs and t.max_steps == -1):
        problems.append(f"trainer.max_steps={t.max_steps} must be >= 0"
                        + (" (or -1 with trainer.max_epochs)" if hasattr(t, "max_epochs") else ""))
    if by_epochs and t.max_epochs < 1:
        problems.append(f"trainer.max_epochs={t.max_epochs} must be >= 1 (null: max_steps alone)")
    if t.gradient_clip_val < 0:
        problems.append(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0 (0 = off)")
    ckpt = cfg.exp_manager.checkpoint_callback_params
    _check_positive(problems, "exp_manager.checkpoint_callback_params", ckpt,
                    ["every_n_train_steps"], minimum=0)
    _check_positive(problems, "exp_manager.checkpoint_callback_params", ckpt, ["save_top_k"])
    _check_choice(problems, "exp_manager.checkpoint_callback_params.monitor", ckpt.monitor,
                  ("step", "val_loss"))
    if ckpt.monitor == "val_loss" and t.limit_val_batches == 0:
        problems.append("exp_manager.checkpoint_callback_params.monitor=val_loss needs "
                        "validation: set trainer.limit_val_batches > 0 or monitor=step")
    elif ckpt.monitor == "val_loss" and ckpt.every_n_train_steps > 0 and t.max_steps > 0 \
            and t.val_check_interval > 0 \
            and math.lcm(ckpt.every_n_train_steps, t.val_check_interval) > t.max_steps:
        problems.append(
            "exp_manager.checkpoint_callback_params.monitor=val_loss ranks checkpoints by "
            f"their own step's validation loss, but no save step (every "
            f"{ckpt.every_n_train_steps}) is a validation step (trainer.val_check_interval="
            f"{t.val_check_interval}) within trainer.max_steps={t.max_steps}: make "
            "every_n_train_steps a multiple of val_check_interval, or monitor=step")
    if not cfg.exp_manager.name or "/" in cfg.exp_manager.name:
        problems.append(f"exp_manager.name={cfg.exp_manager.name!r} must be a non-empty "
                        "directory name without '/'")
    _check_choice(problems, "trainer.nan_policy", cfg.trainer.nan_policy, ("stop", "skip"))
    if cfg.trainer.max_consecutive_skips is not None and cfg.trainer.max_consecutive_skips < 1:
        problems.append(f"trainer.max_consecutive_skips={cfg.trainer.max_consecutive_skips} "
                        "must be >= 1, or null for no bound")
    from danube.config.derived import parse_max_time

    try:
        parse_max_time(cfg.trainer.max_time)
    except ValueError as error:
        problems.append(f"trainer.max_time: {error} (e.g. 00:03:50:00 for 3 h 50 min)")


def _check_architecture(m: ModelConfig, problems: List[str]) -> None:
    _check_positive(problems, "model", m, ["num_layers", "hidden_size", "ffn_hidden_size",
                                           "num_attention_heads", "encoder_seq_length",
                                           "max_position_embeddings", "micro_batch_size",
                                           "global_batch_size", "make_vocab_size_divisible_by"])
    _check_choice(problems, "model.position_embedding_type", m.position_embedding_type,
                  ("rope", "learned_absolute"))
    _check_choice(problems, "model.normalization", m.normalization, ("rmsnorm", "layernorm"))
    _check_choice(problems, "model.activation", m.activation,
                  ("swiglu", "fast-swiglu", "gelu", "squared-relu"))
    _check_choice(problems, "model.attention_backend", m.attention_backend,
                  ("auto", "sdpa", "flex", "local", "flash", "fused", "unfused"))
    _check_choice(problems, "model.cross_entropy_fusion_impl", m.cross_entropy_fusion_impl,
                  ("native", "te"))
    _check_choice(problems, "model.optim.grad_sync_dtype", m.optim.grad_sync_dtype,
                  ("fp32", "bf16"))
    if m.attention_backend == "flex" and m.attention_dropout > 0:
        problems.append(f"model.attention_backend=flex has no attention dropout but "
                        f"model.attention_dropout={m.attention_dropout}: set it to 0, or use "
                        "model.attention_backend=sdpa")
    if m.vocab_size is not None and m.vocab_size < 1:
        problems.append(f"model.vocab_size={m.vocab_size} must be >= 1 (null = the tokenizer's)")
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if m.num_query_groups is not None and (groups < 1 or heads % groups):
        problems.append(f"model.num_query_groups={m.num_query_groups}: num_attention_heads "
                        f"({heads}) must be a multiple of it; use a divisor of {heads}")
    if m.kv_channels is None and heads > 0 and m.hidden_size % heads:
        problems.append(f"model.hidden_size={m.hidden_size} is not divisible by "
                        f"num_attention_heads={heads}; change one or set model.kv_channels")
    if m.encoder_seq_length > m.max_position_embeddings:
        problems.append(f"model.encoder_seq_length={m.encoder_seq_length} exceeds "
                        f"max_position_embeddings={m.max_position_embeddings}; raise the latter")
    if hasattr(m.data, "seq_length") and m.data.seq_length != m.encoder_seq_length:
        problems.append(f"model.data.seq_length={m.data.seq_length} must equal "
                        f"model.encoder_seq_length={m.encoder_seq_length}")
    if m.window_size is not None and not 1 <= m.window_size <= m.max_position_embeddings:
        problems.append(f"model.window_size={m.window_size} must be between 1 and "
                        f"max_position_embeddings={m.max_position_embeddings} (null = no window)")
    if not 0 < m.rotary_percentage <= 1:
        problems.append(f"model.rotary_percentage={m.rotary_percentage} must be in (0, 1]")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0 <= getattr(m, name) < 1:
            problems.append(f"model.{name}={getattr(m, name)} must be in [0, 1)")
    granularity = m.activations_checkpoint_granularity
    _check_choice(problems, "model.activations_checkpoint_granularity", granularity,
                  (None, "selective", "full"))
    if granularity == "full" and (m.activations_checkpoint_method not in ("uniform", "block")
                                  or not m.activations_checkpoint_num_layers):
        problems.append("model.activations_checkpoint_granularity=full needs "
                        "activations_checkpoint_method (uniform|block) and "
                        "activations_checkpoint_num_layers >= 1")


def _check_parallelism(cfg: PretrainConfig, problems: List[str]) -> None:
    m = cfg.model
    tp, pp, cp = (m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                  m.context_parallel_size)
    vp = m.virtual_pipeline_model_parallel_size
    _check_positive(problems, "model", m, ["tensor_model_parallel_size",
                                           "pipeline_model_parallel_size",
                                           "context_parallel_size"])
    if min(tp, pp, cp) < 1:
        return
    groups = m.num_query_groups or m.num_attention_heads
    for name, value in (("num_attention_heads", m.num_attention_heads),
                        ("num_query_groups", groups), ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % tp:
            problems.append(f"model.tensor_model_parallel_size={tp} must divide "
                            f"model.{name}={value}")
    stages = pp * (vp or 1)
    if m.num_layers % stages:
        problems.append(f"model.num_layers={m.num_layers} must be divisible by pipeline "
                        f"stages x virtual stages = {stages}")
    if vp is not None and (vp < 1 or pp < 2):
        problems.append(f"model.virtual_pipeline_model_parallel_size={vp} needs "
                        "pipeline_model_parallel_size >= 2 (null disables interleaving)")
    if m.make_vocab_size_divisible_by >= 1 and m.make_vocab_size_divisible_by % tp:
        problems.append(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} "
                        f"must be a multiple of tensor_model_parallel_size={tp} (the padded "
                        "vocabulary is split across TP ranks); e.g. 128")
    if m.sequence_parallel and tp < 2:
        problems.append("model.sequence_parallel=true needs tensor_model_parallel_size >= 2")
    if m.sequence_parallel and m.encoder_seq_length % tp:
        problems.append(f"model.encoder_seq_length={m.encoder_seq_length} must be divisible "
                        f"by tensor_model_parallel_size={tp} with sequence_parallel")
    if cp > 1 and not m.transformer_engine:
        problems.append(f"model.context_parallel_size={cp} needs Transformer Engine: set "
                        "model.transformer_engine=true (and run where TE is installed)")
    _check_choice(problems, "model.cp_comm_type", m.cp_comm_type,
                  ("p2p", "all_gather", "a2a", "a2a+p2p"))
    if cp > 1 and m.window_size is not None and m.cp_comm_type not in ("all_gather", "a2a"):
        problems.append(f"model.cp_comm_type={m.cp_comm_type} with context_parallel_size={cp} "
                        f"and window_size={m.window_size}: Transformer Engine runs a sliding "
                        "window under context parallelism only with cp_comm_type=a2a or "
                        "all_gather")
    if cp > 1 and m.encoder_seq_length % (2 * cp):
        problems.append(f"model.encoder_seq_length={m.encoder_seq_length} must be divisible "
                        f"by 2 x context_parallel_size={2 * cp}")
    world = world_size(cfg)
    if world % (tp * pp * cp):
        problems.append(f"world size trainer.devices x num_nodes = {world} is not divisible by "
                        f"TP x PP x CP = {tp * pp * cp}")
        return
    dp = data_parallel_size(m, world)
    if m.micro_batch_size >= 1 and m.global_batch_size % (m.micro_batch_size * dp):
        problems.append(f"model.global_batch_size={m.global_batch_size} must be divisible by "
                        f"micro_batch_size x data-parallel size = {m.micro_batch_size} x {dp}")


def _check_fp8(cfg: PretrainConfig, problems: List[str]) -> None:
    m = cfg.model
    _check_choice(problems, "model.fp8_recipe", m.fp8_recipe,
                  ("delayed", "tensorwise", "blockwise", "mxfp8"))
    _check_choice(problems, "model.fp8_amax_compute_algo", m.fp8_amax_compute_algo,
                  ("max", "most_recent"))
    if not m.fp8:
        return
    if m.fp8_e4m3 == m.fp8_hybrid:
        problems.append("model.fp8=true needs exactly one of model.fp8_e4m3 / model.fp8_hybrid")
    if not m.transformer_engine:
        problems.append("model.fp8=true needs model.transformer_engine=true (FP8 runs in TE)")
    if str(cfg.trainer.precision) != "auto" and \
            normalized_precision(cfg.trainer.precision) != "bf16":
        problems.append("model.fp8=true needs trainer.precision=bf16-mixed or auto (FP8 GEMMs "
                        "with bf16 weights and activations)")


def _check_optim(cfg: PretrainConfig, problems: List[str]) -> None:
    o = cfg.model.optim
    _check_choice(problems, "model.optim.name", o.name,
                  ("adamw", "fused_adam", "distributed_fused_adam"))
    _check_choice(problems, "model.optim.sched.name", o.sched.name,
                  ("CosineAnnealing", "LinearAnnealing", "Constant"))
    if o.lr <= 0:
        problems.append(f"model.optim.lr={o.lr} must be > 0")
    if o.weight_decay < 0:
        problems.append(f"model.optim.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        problems.append(f"model.optim.betas={o.betas} must be two numbers in [0, 1)")
    if not 0 <= o.sched.min_lr <= o.lr:
        problems.append(f"model.optim.sched.min_lr={o.sched.min_lr} must be in [0, lr={o.lr}]")
    horizon = o.sched.max_steps or schedule_default_horizon(cfg)
    if o.sched.warmup_steps < 0 or o.sched.constant_steps < 0:
        problems.append("model.optim.sched.warmup_steps and constant_steps must be >= 0")
    # horizon 0: trainer.max_steps=0 saves the initial weights and runs no update
    elif horizon > 0 and o.sched.warmup_steps + o.sched.constant_steps > horizon:
        problems.append(f"model.optim.sched: warmup_steps ({o.sched.warmup_steps}) + "
                        f"constant_steps ({o.sched.constant_steps}) exceed the decay horizon "
                        f"({horizon} steps); shorten them or raise trainer.max_steps")


def _check_data(cfg: PretrainConfig, problems: List[str]) -> None:
    m = cfg.model
    data, tok = m.data, m.tokenizer
    _check_choice(problems, "model.tokenizer.library", tok.library, ("huggingface", "embedded"))
    if tok.library == "huggingface" and not tok.model:
        problems.append("model.tokenizer.model is required with library=huggingface: the path "
                        "of a tokenizer.json or of the directory holding it")
    if tok.library == "embedded" and tok.vocab_size < 512:
        problems.append(f"model.tokenizer.vocab_size={tok.vocab_size} must be >= 512 for the "
                        "embedded byte-level BPE (256 bytes + specials + merges)")
    if data.reset_position_ids and m.position_embedding_type == "rope":
        problems.append("model.data.reset_position_ids=true has no effect with "
                        "position_embedding_type=rope (megatron-core's GPTModel takes rotary "
                        "positions from the sequence length, not from position ids): set it to "
                        "false")
    if data.num_workers < 0:
        problems.append(f"model.data.num_workers={data.num_workers} must be >= 0")
    prefix = data.data_prefix
    if prefix is None or (isinstance(prefix, (list, dict)) and not prefix):
        problems.append("model.data.data_prefix is empty: give [weight, prefix, ...] of "
                        "indexed .bin/.idx files, or [1.0, embedded:prose] for the built-in corpus")
        return
    if isinstance(prefix, dict):
        unknown = set(prefix) - {"train", "validation", "test"}
        if unknown or "train" not in prefix:
            problems.append(f"model.data.data_prefix as a dict needs a 'train' list and only "
                            f"train/validation/test keys; got {sorted(prefix)}")
        splits = {k: v for k, v in prefix.items() if k in ("train", "validation", "test")}
    else:
        splits = {"": prefix}
        parts = data.splits_string.replace("/", ",").split(",")
        try:
            shares = [float(x) for x in parts]
        except ValueError:
            shares = []
        if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
            problems.append(f"model.data.splits_string={data.splits_string!r} must be three "
                            "non-negative numbers train,validation,test (e.g. 980,10,10)")
        else:
            _check_split_use(cfg, dict(zip(("train", "validation", "test"), shares)), problems)
    for split, group in splits.items():
        if group is None:
            continue
        _, _, errors = parse_blend(group)
        key = "model.data.data_prefix" + (f".{split}" if split else "")
        problems.extend(f"{key}: {e}" for e in errors)
    for path in blend_paths(data):
        if path.startswith(EMBEDDED_PREFIX):
            source = path[len(EMBEDDED_PREFIX):]
            if source not in EMBEDDED_SOURCES:
                problems.append(f"model.data.data_prefix: unknown embedded source {path!r}; "
                                f"use {' or '.join(EMBEDDED_PREFIX + s for s in EMBEDDED_SOURCES)}")
            if tok.library != "embedded":
                problems.append(f"model.data.data_prefix uses {path} but "
                                f"model.tokenizer.library={tok.library!r}: the embedded corpus "
                                "is tokenized with library=embedded")


def _check_split_use(cfg: PretrainConfig, shares: dict, problems: List[str]) -> None:
    """A split the run reads must get a share of the data."""
    wanted = {"train": cfg.trainer.max_steps, "validation": cfg.trainer.limit_val_batches,
              "test": cfg.trainer.limit_test_batches}
    keys = {"train": "trainer.max_steps", "validation": "trainer.limit_val_batches",
            "test": "trainer.limit_test_batches"}
    for split, share in shares.items():
        if share == 0 and wanted[split] > 0:
            problems.append(f"model.data.splits_string={cfg.model.data.splits_string!r} gives "
                            f"the {split} split nothing but {keys[split]}={wanted[split]}: give it "
                            f"a share or set {keys[split]}=0")


def _check_sft_data(cfg: SFTConfig, problems: List[str]) -> None:
    m, data = cfg.model, cfg.model.data
    if not m.restore_from_path:
        problems.append("model.restore_from_path is required: the checkpoint (or run directory) "
                        "SFT starts from")
    if not data.train_ds.file_path:
        problems.append("model.data.train_ds.file_path is required: a JSONL file (or list), or "
                        "embedded:chat")
    _check_choice(problems, "model.data.on_error", data.on_error, ("raise", "skip"))
    for split in ("train_ds", "validation_ds"):
        ds, key = getattr(data, split), f"model.data.{split}"
        _check_choice(problems, f"{key}.truncation_method", ds.truncation_method,
                      ("right", "left"))
        if not data.chat and ("{" + ds.truncation_field + "}" not in ds.prompt_template
                              or ds.truncation_field == ds.label_key):
            problems.append(f"{key}.truncation_field={ds.truncation_field!r} must be a field "
                            f"of prompt_template other than the answer ({ds.label_key!r}): it "
                            "is what gets shortened when a record is too long")
        if not ds.drop_last:
            problems.append(f"{key}.drop_last=false is not supported (as in NeMo-Aligner): "
                            "every global batch is whole")
        if ds.max_seq_length != m.encoder_seq_length:
            problems.append(f"{key}.max_seq_length={ds.max_seq_length} must equal "
                            f"model.encoder_seq_length={m.encoder_seq_length} (the row length)")
        _check_positive(problems, key, ds, ["global_batch_size", "micro_batch_size",
                                            "min_seq_length"])
        if data.chat and ds.add_eos:
            problems.append(f"{key}.add_eos=true with model.data.chat=true: a chat "
                            "conversation ends as its template renders it (the model's "
                            "end-of-turn token); an extra EOS would be trained after it. Set "
                            f"{key}.add_eos=null (or false)")
        if not data.chat and "{" + ds.label_key + "}" not in ds.prompt_template:
            problems.append(f"{key}.prompt_template={ds.prompt_template!r} lacks "
                            f"{{{ds.label_key}}} (label_key)")
    _check_peft(m, problems)
    ds = data.train_ds
    if ds.packed_sequence and m.context_parallel_size > 1:
        problems.append("model.data.train_ds.packed_sequence=true with context_parallel_size="
                        f"{m.context_parallel_size}: packed (THD) batches are not split across "
                        "context-parallel ranks yet; set one of them off")
    if (ds.global_batch_size, ds.micro_batch_size) != (m.global_batch_size, m.micro_batch_size):
        problems.append(f"model.data.train_ds global/micro batch sizes ({ds.global_batch_size}/"
                        f"{ds.micro_batch_size}) must equal model.global_batch_size/"
                        f"micro_batch_size ({m.global_batch_size}/{m.micro_batch_size})")


def _check_dpo(cfg: DPOConfig, problems: List[str]) -> None:
    m, data, d = cfg.model, cfg.model.data, cfg.model.dpo
    if not m.restore_from_path:
        problems.append("model.restore_from_path is required: the checkpoint (or run directory) "
                        "DPO starts from, also the reference policy (an SFT run's)")
    prefix = data.data_prefix
    if not isinstance(prefix, dict) or set(prefix) - {"train", "validation", "test"}:
        problems.append(f"model.data.data_prefix={prefix!r} must be a mapping with train "
                        "(and optionally validation, test): JSONL files of pairs")
    elif not prefix.get("train"):
        problems.append("model.data.data_prefix.train is required: a JSONL file of preference "
                        "pairs (or a list), or embedded:preference")
    if data.data_impl != "jsonl":
        problems.append(f"model.data.data_impl={data.data_impl!r}: only jsonl; for packing set "
                        "model.data.packed_sequence=true (no offline packed files needed)")
    _check_choice(problems, "model.data.on_error", data.on_error, ("raise", "skip"))
    _check_choice(problems, "model.dpo.preference_loss", d.preference_loss, PREFERENCE_LOSSES)
    _check_choice(problems, "model.dpo.ref_log_probs", d.ref_log_probs,
                  ("on_the_fly", "precompute"))
    if d.ref_policy_kl_penalty <= 0:
        problems.append(f"model.dpo.ref_policy_kl_penalty={d.ref_policy_kl_penalty} (beta) must "
                        "be > 0")
    if not 0 <= d.label_smoothing < 0.5:
        problems.append(f"model.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    elif d.label_smoothing > 0 and d.preference_loss not in ("dpo", "robust"):
        problems.append(f"model.dpo.label_smoothing={d.label_smoothing} applies to "
                        f"preference_loss dpo (cDPO) or robust, not {d.preference_loss!r}: "
                        "set it to 0")
    if d.log_prob_forward_micro_batch_size not in (None, m.micro_batch_size):
        problems.append(f"model.dpo.log_prob_forward_micro_batch_size="
                        f"{d.log_prob_forward_micro_batch_size} must equal model.micro_batch_size"
                        f"={m.micro_batch_size} (or null): the reference runs the policy's "
                        "micro-batches, so that both agree bit for bit at step 0")
    if d.preference_loss_weight == 0 and d.sft_loss_weight == 0:
        problems.append("model.dpo.preference_loss_weight and sft_loss_weight are both 0: "
                        "nothing would be trained")
    for key in ("hidden_dropout", "attention_dropout"):
        if getattr(m, key) > 0:
            problems.append(f"model.{key}={getattr(m, key)}: DPO needs dropout off (the policy "
                            "must equal the reference at step 0, and the log-prob ratios must "
                            "not be noise): set it to 0")
    if m.context_parallel_size > 1:
        problems.append("model.context_parallel_size > 1 is not supported for DPO yet (per-pair "
                        "log-probs are gathered per sequence): set it to 1")
    _check_peft(m, problems)
    if m.peft.peft_scheme == "lora" and m.peft.lora_tuning.row_init_method != "zero":
        problems.append("model.peft.lora_tuning.row_init_method must be zero for DPO: the "
                        "reference is the model with adapters disabled, so the adapted model "
                        "must start equal to it")


def _check_peft(m, problems: List[str]) -> None:
    peft, lora = m.peft, m.peft.lora_tuning
    _check_choice(problems, "model.peft.peft_scheme", peft.peft_scheme, ("none", "lora"))
    if peft.peft_scheme != "lora":
        return
    key = "model.peft.lora_tuning"
    if lora.adapter_dim < 1:
        problems.append(f"{key}.adapter_dim={lora.adapter_dim} must be >= 1")
    if not 0 <= lora.adapter_dropout < 1:
        problems.append(f"{key}.adapter_dropout={lora.adapter_dropout} must be in [0, 1)")
    _check_choice(problems, f"{key}.dropout_position", lora.dropout_position, ("pre", "post"))
    unknown = [t for t in lora.target_modules if t not in LORA_TARGETS]
    if unknown or not lora.target_modules:
        problems.append(f"{key}.target_modules={list(lora.target_modules)}: use some of "
                        f"{', '.join(LORA_TARGETS)}")
    for name in ("column_init_method", "row_init_method"):
        _check_choice(problems, f"{key}.{name}", getattr(lora, name),
                      ("xavier", "kaiming", "normal", "zero"))
    if m.sequence_parallel:
        problems.append("model.peft.peft_scheme=lora with model.sequence_parallel=true is not "
                        "supported yet: set sequence_parallel=false")


def _check_downstream(cfg, problems: List[str]) -> None:
    d, key = cfg.model.downstream_eval, "model.downstream_eval"
    if not d.tasks:
        return
    from danube.task_names import offline_task_names

    unknown = sorted(set(d.tasks) - offline_task_names())
    if unknown:
        problems.append(f"{key}.tasks: {unknown} are not offline tasks; use some of "
                        f"{sorted(offline_task_names())} (eval/evaluate.py --list)")
    if cfg.model.pipeline_model_parallel_size != 1:
        problems.append(f"{key} scores the live model and needs "
                        "model.pipeline_model_parallel_size=1: evaluate the checkpoints with "
                        "eval/evaluate.py instead")
    _check_positive(problems, key, d, ["limit", "batch_size"])
    if d.every_n_steps is not None and d.every_n_steps < 1:
        problems.append(f"{key}.every_n_steps={d.every_n_steps} must be >= 1 (or null)")


def _check_stages(cfg, problems: List[str]) -> None:
    """model.seq_length_stages: pretraining only; whole stages that fit the model, the batch
    layout (stages whose tokens per step differ get a token-counted LR schedule)."""
    m = cfg.model
    stages = m.seq_length_stages
    if not stages:
        return
    if not isinstance(cfg, PretrainConfig):
        problems.append("model.seq_length_stages is a pretraining ramp; leave it empty here "
                        "(fine-tuning runs at model.encoder_seq_length)")
        return
    dp = data_parallel_size(m, world_size(cfg))
    for i, stage in enumerate(stages):
        key = f"model.seq_length_stages[{i}]"
        if min(stage.tokens, stage.encoder_seq_length, stage.global_batch_size) <= 0:
            problems.append(f"{key}: tokens, encoder_seq_length and global_batch_size must be "
                            f"> 0 (got {stage.tokens}, {stage.encoder_seq_length}, "
                            f"{stage.global_batch_size})")
            return
        micro = stage.micro_batch_size or m.micro_batch_size
        if micro >= 1 and stage.global_batch_size % (micro * dp):
            problems.append(f"{key}.global_batch_size={stage.global_batch_size} must be "
                            f"divisible by its micro_batch_size x data-parallel size "
                            f"({micro} x {dp}); set {key}.micro_batch_size")
    for key, blend in stage_blends(m):
        if isinstance(blend, dict):
            problems.append(f"{key}: a stage takes one blend ([w1, prefix1, ...]) split by "
                            "model.data.splits_string, not per-split entries")
            continue
        _, _, errors = parse_blend(blend)
        problems.extend(f"{key}: {e}" for e in errors)
        unknown = [p for p in blend_paths(replace(m.data, data_prefix=blend))
                   if p.startswith(EMBEDDED_PREFIX)
                   and p[len(EMBEDDED_PREFIX):] not in EMBEDDED_SOURCES]
        if unknown:
            problems.append(f"{key}: unknown embedded source {unknown[0]!r}; use "
                            f"{' or '.join(EMBEDDED_PREFIX + s for s in EMBEDDED_SOURCES)}")
    longest = max(s.encoder_seq_length for s in stages)
    if longest != m.encoder_seq_length:
        problems.append(f"model.encoder_seq_length={m.encoder_seq_length} must be the longest "
                        f"stage's ({longest}): the model is built and exported for it")
    total = sum(stage_steps(m))
    if cfg.trainer.max_steps > total:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps} exceeds the stages' "
                        f"{total} steps: use -1 (all stages) or fewer to stop early")


def validate(cfg) -> List[str]:
    """Every problem of the config (pretraining or SFT), as 'key=value: what is wrong; the fix'
    lines."""
    problems: List[str] = []
    _check_trainer(cfg, problems)
    _check_architecture(cfg.model, problems)
    _check_parallelism(cfg, problems)
    _check_fp8(cfg, problems)
    _check_optim(cfg, problems)
    _check_downstream(cfg, problems)
    _check_stages(cfg, problems)
    STAGE_CHECKS[type(cfg)](cfg, problems)
    return problems


# Each stage's own section checks (data, losses, adapters), by config type.
STAGE_CHECKS = {PretrainConfig: _check_data, SFTConfig: _check_sft_data, DPOConfig: _check_dpo}
