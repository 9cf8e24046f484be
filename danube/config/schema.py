"""Typed schema of a pretraining config (NeMo 1.x `megatron_gpt_config.yaml` layout).

Registered in Hydra's ConfigStore (`danube.config.hydra`), so unknown keys and wrong types
fail at composition. Each default lives here, once. Cross-field rules live in
`danube.config.validate`; launch-time checks (files, TE/CUDA, world size) in
`danube.config.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class TrainerConfig:
    devices: int = 1
    """Processes per node (one per GPU; on CPU, gloo processes). torchrun's count must match."""
    num_nodes: int = 1
    """Number of nodes; world size = devices x num_nodes."""
    accelerator: str = "auto"
    """auto | gpu | cpu. auto picks CUDA (NCCL) when present, else CPU (gloo)."""
    precision: str = "auto"
    """auto | 32 | bf16 | bf16-mixed: fp32 throughout, or bf16 compute with fp32 main weights
    (bf16 and bf16-mixed mean the same). auto: bf16-mixed on CUDA and on CPUs with native bf16
    (AVX512-BF16 or AMX), 32 elsewhere (emulated bf16 runs ~30x slower)."""
    max_steps: int = 100
    """Optimizer steps to train for (one step = one global batch)."""
    val_check_interval: int = 50
    """Run validation every this many steps (and after the last)."""
    limit_val_batches: int = 4
    """Global batches per validation run; 0 disables validation."""
    run_init_validation: bool = False
    """Validate once before the first step of a fresh run, logged at step 0: the starting point
    the validation curves move from (NeMo-Aligner's trainers' `run_init_validation`). In DPO it
    reads ln 2 = 0.693 and accuracy 0, the policy being its reference there. Not on a resume;
    nothing where validation is off (limit_val_batches=0, no validation data)."""
    limit_test_batches: int = 0
    """Global batches of the test split evaluated after training; 0 skips it."""
    log_every_n_steps: int = 10
    """Console, TensorBoard and JSONL logging period, in steps."""
    gradient_clip_val: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""
    max_time: Optional[str] = None
    """Wall-clock budget of this launch, NeMo's DD:HH:MM:SS: the run saves and exits (code 75)
    before the next step would pass it; running again resumes. SIGTERM/SIGUSR1 do the same at
    the next step boundary (preemption, a SLURM time limit's warning signal)."""
    nan_policy: str = "stop"
    """What a non-finite loss or gradient does: stop (the run ends before anything of that
    step is checkpointed, exit code 3, naming the step and the last good checkpoint) | skip
    (that step's update is not applied, weights and Adam state stay as they were, the step
    is logged as skipped and the run goes on: megatron's found-inf check, through a unit
    grad scaler; bf16 only)."""
    max_consecutive_skips: Optional[int] = 10
    """With nan_policy=skip: this many skipped steps in a row end the run as `stop` does
    (exit code 3, before the last of them is checkpointed): a run that only skips has
    diverged. null: no bound (megatron's behaviour). Counted within a launch."""


@dataclass
class CheckpointCallbackParams:
    every_n_train_steps: int = 100
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    save_top_k: int = 3
    """Checkpoints to keep, ranked by `monitor`; the newest one is always kept too."""
    monitor: str = "step"
    """step (keep the newest) | val_loss (keep the lowest validation loss)."""
    save_last: bool = True
    """Save a checkpoint when training ends."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's asynchronous torch_dist save):
    training goes on while a writer process writes the files; the checkpoint is committed at a
    later step boundary. The save before a stop (signal, max_time) and the last one wait."""


@dataclass
class ExpManagerConfig:
    exp_dir: str = "results"
    """Root directory of experiments; this run writes to <exp_dir>/<name>."""
    name: str = "danube"
    """Experiment name (sub-directory of exp_dir)."""
    resume_if_exists: bool = True
    """Resume from the newest complete checkpoint in <exp_dir>/<name>/checkpoints."""
    resume_ignore_no_checkpoint: bool = True
    """With resume_if_exists, start from scratch when there is no checkpoint yet."""
    resume_accept_data_plan_change: bool = False
    """Resume even when the training data would be read in another order than the run so far
    (other data, seed, seq_length, splits, or an index horizon that reshuffles a source read
    for several epochs); without it such a resume is refused, naming what changed."""
    create_tensorboard_logger: bool = True
    """Write TensorBoard events to <exp_dir>/<name>/tensorboard."""
    checkpoint_callback_params: CheckpointCallbackParams = field(
        default_factory=CheckpointCallbackParams
    )
    """When to save checkpoints and how many to keep."""


@dataclass
class TokenizerConfig:
    library: str = "huggingface"
    """huggingface (a tokenizer.json, or a directory holding one) | embedded (byte-level BPE
    trained on the embedded standard-library corpus, cached)."""
    model: Optional[str] = None
    """Path of the tokenizer.json (or its directory) for library=huggingface."""
    vocab_size: int = 8192
    """Vocabulary size to train for library=embedded (ignored otherwise)."""


@dataclass
class DataConfig:
    data_prefix: Any = None
    """NeMo-style blend: [w1, prefix1, w2, prefix2, ...], [prefix], or a dict with train /
    validation / test lists. A prefix names <prefix>.bin/.idx; `embedded:prose` and
    `embedded:code` name the built-in corpus."""
    splits_string: str = "980,10,10"
    """train,validation,test proportions of each prefix (ignored for a per-split dict)."""
    seq_length: int = "${model.encoder_seq_length}"  # type: ignore[assignment]
    """Tokens per training sample; must equal model.encoder_seq_length."""
    index_mapping_dir: Optional[str] = None
    """Where GPTDataset caches its index .npy files; default: <exp_dir>/<name>/index_cache.
    Experiments may share one: each job's rank 0 builds it under a file lock."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token (learned_absolute positions only:
    megatron-core's RoPE takes positions from the sequence length, so with rope it is refused)."""
    reset_attention_mask: bool = False
    """Block attention across end-of-document tokens (our sdpa/local attention; Transformer
    Engine's causal kernels ignore the mask, so it is refused there)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    embedded_cache_dir: Optional[str] = None
    """Cache of the embedded corpus and tokenizer; default $DANUBE_CACHE or ~/.cache/danube."""


@dataclass
class SchedConfig:
    name: str = "CosineAnnealing"
    """CosineAnnealing | LinearAnnealing | Constant (after linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to optim.lr, in steps."""
    constant_steps: int = 0
    """Steps held at min_lr at the end; decay runs until max_steps - constant_steps."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    max_steps: Optional[int] = None
    """Decay horizon in steps; default trainer.max_steps (set it to stop a run early
    without changing its schedule)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | fused_adam (same: AdamW) | distributed_fused_adam (AdamW with the optimizer
    state sharded across data-parallel ranks: megatron-core's distributed optimizer)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay, not applied to biases and norm weights."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    sched: SchedConfig = field(default_factory=SchedConfig)
    """Learning-rate schedule."""
    overlap_grad_sync: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass (megatron DDP's
    overlap_grad_reduce, by buckets); applies with data-parallel size > 1."""
    overlap_param_sync: bool = True
    """With distributed_fused_adam: overlap the all-gather of updated weights with the next
    forward pass (megatron's overlap_param_gather); applies with data-parallel size > 1."""
    grad_sync_dtype: str = "fp32"
    """fp32 | bf16: dtype of the data-parallel gradient reduce under bf16 (bf16 halves the
    traffic, Megatron-LM's --grad-reduce-in-bf16, at some gradient precision)."""


@dataclass
class DownstreamEvalConfig:
    """Benchmarks scored during training (lm-evaluation-harness on the live model), logged
    beside the validation loss. No NeMo key: NeMo, Megatron and torchtitan log only loss."""

    tasks: List[str] = field(default_factory=list)
    """Offline task names or suites (eval/tasks/, `eval/evaluate.py --list`); empty = off."""
    limit: int = 100
    """Documents per task (a fixed subset: the first N, the same every time)."""
    every_n_steps: Optional[int] = None
    """Steps between evaluations; null = at every validation (trainer.val_check_interval)
    and at the last step."""
    num_fewshot: Optional[int] = None
    """Few-shot examples (null: the task's default)."""
    batch_size: int = 8
    """Requests per forward pass."""


@dataclass
class SeqLengthStage:
    """One stage of a sequence-length ramp (H2O-Danube: 700B tokens at 2048, then 100B each
    at 4096, 8192 and 16384)."""

    tokens: int = 0
    """Tokens trained in this stage (rounded up to whole steps)."""
    encoder_seq_length: int = 2048
    """Training sequence length of this stage."""
    global_batch_size: int = 576
    """Sequences per step in this stage. Stages whose tokens per step (this x
    encoder_seq_length) differ get a token-counted LR schedule."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward pass in this stage; default model.micro_batch_size."""
    data_prefix: Any = None
    """This stage's blend instead of the run's, as model.data.data_prefix's list form
    ([w1, prefix1, ...]), split by model.data.splits_string; null = the run's blend."""


@dataclass
class ModelConfig:
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step; gradient accumulation = global / (micro x data-parallel)."""
    tensor_model_parallel_size: int = 1
    """Tensor (intra-layer) parallel size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline (inter-layer) parallel size."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank for the interleaved schedule; null = no interleaving."""
    context_parallel_size: int = 1
    """Context (sequence-split attention) parallel size; needs Transformer Engine."""
    cp_comm_type: str = "p2p"
    """Context-parallel attention exchange: p2p (ring) | all_gather | a2a | a2a+p2p. Transformer
    Engine runs a sliding window only with all_gather or a2a."""
    sequence_parallel: bool = False
    """Split norms/dropout activations along the sequence across the TP group (TP > 1)."""
    seed: int = 1234
    """Seed of weight init, dropout and data order."""

    encoder_seq_length: int = 256
    """Training sequence length in tokens (with seq_length_stages: the longest stage's)."""
    seq_length_stages: List[SeqLengthStage] = field(default_factory=list)
    """Pretraining's sequence-length ramp, in order; empty: one stage of encoder_seq_length x
    global_batch_size for trainer.max_steps. With stages, trainer.max_steps=-1 runs them all
    (a lower value stops early, the data order and schedule staying those of the whole ramp);
    each stage builds its own data index; optimizer, schedule and step count carry across."""
    max_position_embeddings: int = 256
    """Longest context the model supports (RoPE tables, exported config)."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Model width."""
    ffn_hidden_size: int = 704
    """MLP inner width (per branch for SwiGLU)."""
    num_attention_heads: int = 8
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); null = num_attention_heads."""
    kv_channels: Optional[int] = None
    """Head dimension; null = hidden_size / num_attention_heads."""
    window_size: Optional[int] = None
    """Sliding attention window in tokens, counting the query itself (HF Mistral's
    `sliding_window`); null = full causal attention."""
    position_embedding_type: str = "rope"
    """rope | learned_absolute."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rotary_percentage: float = 1.0
    """Fraction of each head's dimensions rotated by RoPE."""
    normalization: str = "rmsnorm"
    """rmsnorm | layernorm."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    activation: str = "fast-swiglu"
    """swiglu | fast-swiglu (same) | gelu | squared-relu."""
    bias: bool = False
    """Biases in linear layers."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the LM head."""
    vocab_size: Optional[int] = None
    """Rows of the embedding and LM head before padding; null = the tokenizer's size. Set by
    the importer when a model's config.json has more rows than its tokenizer has tokens."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (not scaled by TP, so checkpoints move between
    layouts); tensor_model_parallel_size must divide it."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    transformer_engine: bool = True
    """Use Transformer Engine's layer spec when TE and CUDA are present (required for FP8)."""
    attention_backend: str = "auto"
    """auto | sdpa | flex | local | flash | fused | unfused. auto: TE's choice with TE; else
    flex on a CUDA GPU (FlexAttention: the window's blocks only, packed documents; needs
    attention_dropout=0) and sdpa on a CPU (torch SDPA, dense window mask); local:
    megatron-core's unfused DotProductAttention; flash/fused/unfused force a TE backend."""
    gradient_accumulation_fusion: bool = True
    """Fuse the weight-gradient GEMM with its accumulation into the fp32 main grad; applies
    with Transformer Engine layers and apex's fused_weight_gradient_mlp_cuda (else off)."""
    bias_activation_fusion: bool = True
    """Fused (bias-)SwiGLU/GeLU kernel, also without biases; applies on CUDA."""
    cross_entropy_loss_fusion: bool = True
    """Fused vocab-parallel cross-entropy; applies on CUDA."""
    cross_entropy_fusion_impl: str = "native"
    """native (megatron's fused kernel) | te (Transformer Engine's; needs TE)."""
    fp8: bool = False
    """Train linear layers in FP8 (Hopper or newer, needs TE). The LM head stays bf16."""
    fp8_e4m3: bool = False
    """FP8 format e4m3 for all tensors."""
    fp8_hybrid: bool = True
    """FP8 format hybrid: e4m3 forward, e5m2 gradients."""
    fp8_recipe: str = "delayed"
    """delayed | tensorwise | blockwise | mxfp8 (Blackwell)."""
    fp8_margin: int = 0
    """Scaling-factor margin (powers of two)."""
    fp8_interval: int = 1
    """Steps between scaling-factor updates (delayed recipe)."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history window (delayed recipe)."""
    fp8_amax_compute_algo: str = "max"
    """max | most_recent: how the scale is derived from the amax history."""

    activations_checkpoint_granularity: Optional[str] = None
    """null | selective | full activation recomputation."""
    activations_checkpoint_method: Optional[str] = None
    """uniform | block (with granularity=full)."""
    activations_checkpoint_num_layers: Optional[int] = None
    """Layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""

    restore_from_path: Optional[str] = None
    """Initialise the weights from this checkpoint directory (weights only: fresh optimizer,
    step 0). Ignored when the run resumes from its own checkpoint."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Pretraining data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    downstream_eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)
    """Benchmarks scored while training (off unless `tasks` names some)."""


@dataclass
class PretrainConfig:
    name: str = "danube_pretrain"
    """Config name, for the logs."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, precision, logging cadence."""
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    """Output directory, checkpoints, resume."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture, parallelism, data, optimizer."""


# --- Supervised fine-tuning (NeMo-Aligner's gpt_sft.yaml names) --------------------------------


@dataclass
class SFTTrainerConfig(TrainerConfig):
    max_epochs: Optional[int] = None
    """Passes over train_ds; training stops at max_steps or max_epochs, whichever comes first
    (max_steps=-1: epochs alone)."""


@dataclass
class ChatPromptTokensConfig:
    """NeMo's fixed chat template: {system_turn_start}System{end_of_name}{system}{end_of_turn},
    then {turn_start}{User|Assistant}{end_of_name}{text}{end_of_turn} per turn."""

    system_turn_start: str = "<extra_id_0>"
    """Opens the system turn."""
    turn_start: str = "<extra_id_1>"
    """Opens each user or assistant turn."""
    label_start: str = "<extra_id_2>"
    """NeMo's SteerLM attribute-label marker: records with labels are refused (ChatDataError
    naming the record), so it is never rendered; kept so NeMo configs compose."""
    end_of_turn: str = "\n"
    """Closes each turn (trained after an answer)."""
    end_of_name: str = "\n"
    """Follows the speaker's name (System, User, Assistant)."""


@dataclass
class SFTDatasetConfig:
    file_path: Any = None
    """JSONL file (or list of files); `embedded:chat` / `embedded:chat_validation` name the
    built-in stdlib instruction set. null: no such split."""
    global_batch_size: int = "${model.global_batch_size}"  # type: ignore[assignment]
    """Conversations per optimizer step (packed or not)."""
    micro_batch_size: int = "${model.micro_batch_size}"  # type: ignore[assignment]
    """Rows per forward pass (a row holds one conversation, or several when packed)."""
    shuffle: bool = True
    """Reshuffle the conversations every epoch (seeded by model.seed)."""
    drop_last: bool = True
    """Drop the last incomplete global batch of an epoch (true only, as NeMo-Aligner)."""
    max_seq_length: int = "${model.encoder_seq_length}"  # type: ignore[assignment]
    """Tokens per row; longer conversations are cut by truncation_method."""
    min_seq_length: int = 1
    """Conversations with fewer tokens are dropped (and counted)."""
    label_key: str = "output"
    """Answer field of prompt-response records."""
    add_eos: Optional[bool] = None
    """Prompt-response: end the answer with the model's end-of-sequence token (trained); null
    = true. Chat: the template decides the end-of-turn tokens (true is refused)."""
    add_bos: bool = False
    """Start every sample with the beginning-of-sequence token."""
    truncation_field: str = "input"
    """Prompt-response: the field shortened (by truncation_method) when a record is too long,
    so the answer stays whole (NeMo's); a field of prompt_template, not the answer."""
    truncation_method: str = "right"
    """right: keep the start, cut the end | left: keep the end."""
    prompt_template: str = "{input} {output}"
    """Prompt-response rendering; the answer field must come last."""
    packed_sequence: bool = False
    """Pack several conversations per row within each global batch, each isolated."""


# validation_ds keys that default to train_ds's (as ${model.data.train_ds.<key>}).
VALIDATION_INHERITS = ("prompt_template", "label_key", "add_eos", "add_bos",
                       "truncation_field", "truncation_method")


@dataclass
class SFTDataConfig:
    chat: bool = True
    """Chat records (messages or NeMo conversations) rendered with a chat template; false:
    prompt-response records with prompt_template."""
    chat_prompt_tokens: Optional[ChatPromptTokensConfig] = None
    """NeMo's fixed template tokens; null: the tokenizer's chat template, else H2O-Danube's."""
    train_ds: SFTDatasetConfig = field(default_factory=SFTDatasetConfig)
    """Training conversations."""
    validation_ds: SFTDatasetConfig = field(
        default_factory=lambda: SFTDatasetConfig(shuffle=False, **{
            key: f"${{model.data.train_ds.{key}}}" for key in VALIDATION_INHERITS}))
    """Validation conversations (val_loss over answer tokens); its rendering keys follow
    train_ds unless set (NeMo-Aligner's YAML interpolates them the same way)."""
    on_error: str = "raise"
    """raise: stop at the first bad record, naming file and line | skip: count and go on."""
    embedded_cache_dir: Optional[str] = None
    """Cache of the embedded data; default $DANUBE_CACHE or ~/.cache/danube."""


@dataclass
class LoraTuningConfig:
    adapter_dim: int = 32
    """LoRA rank r."""
    alpha: Optional[float] = 32.0
    """Scale numerator: adapters add (alpha / adapter_dim) * B A x. null: adapter_dim (NeMo's
    default: scale 1 at any rank); a number keeps the scale alpha / r (PEFT's lora_alpha), so
    changing only the rank changes it."""
    adapter_dropout: float = 0.0
    """Dropout probability of the adapter path (where: dropout_position)."""
    dropout_position: str = "pre"
    """NeMo's key: pre = on the adapter's input, before A (PEFT's place; our default) | post
    = on the adapter's output, after B (NeMo's default)."""
    target_modules: List[str] = field(default_factory=lambda: ["attention_qkv"])
    """attention_qkv | attention_dense | mlp_fc1 | mlp_fc2 (NeMo's names; megatron's linear_qkv
    | linear_proj | linear_fc1 | linear_fc2 too)."""
    column_init_method: str = "xavier"
    """Init of A (the adapter's input side): xavier | kaiming | normal (std 0.02; NeMo's
    `normal` uses 0.2) | zero."""
    row_init_method: str = "zero"
    """Init of B (the output side); zero makes the adapted model start as the base model."""


@dataclass
class PeftConfig:
    peft_scheme: str = "none"
    """none (full fine-tuning) | lora (frozen base, trained adapters, merged on export)."""
    lora_tuning: LoraTuningConfig = field(default_factory=LoraTuningConfig)
    """LoRA adapters."""


@dataclass
class SFTModelConfig(ModelConfig):
    """The architecture keys are read from the checkpoint SFT starts from (restore_from_path);
    set them only to repeat what it has."""

    answer_only_loss: bool = True
    """Train on answer tokens only (each answer's end-of-turn token included); false: every
    token of the conversation."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)  # type: ignore[assignment]
    """Fine-tuning data."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient fine-tuning (NeMo's model.peft)."""


@dataclass
class SFTConfig:
    name: str = "danube_sft"
    """Config name, for the logs."""
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    """Run length (steps or epochs), precision, logging cadence."""
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    """Output directory, checkpoints, resume."""
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    """Starting checkpoint, parallelism, data, optimizer."""


# --- Direct preference optimization (NeMo-Aligner's gpt_dpo.yaml names) -----------------------


@dataclass
class DPOLossConfig:
    """model.dpo. With u = sum (or mean, preference_average_log_probs) over response tokens of
    log pi - log pi_ref, d = u_chosen - u_rejected, g the pair's rewards, eta gt_reward_scale:
    dpo -log sigmoid(beta d) | ipo (d - 1/(2 beta))^2 | rpo_sq (beta d - eta (g_c - g_r))^2 |
    rpo_bwd_kl KL(sigmoid(eta dg) || sigmoid(beta d)) | rpo_fwd_kl the reverse | hinge
    relu(1 - beta d) | robust (label smoothing). Total = preference_loss_weight * preference +
    sft_loss_weight * (-log pi(chosen)), averaged over the valid pairs of the global batch."""

    ref_policy_kl_penalty: float = 0.2
    """beta."""
    preference_average_log_probs: bool = False
    """u per token (mean over the response) instead of the sum; TRL's IPO is the mean, Aligner's
    the sum."""
    sft_average_log_probs: bool = "${model.dpo.preference_average_log_probs}"  # type: ignore
    """The SFT term per token instead of per sequence."""
    gt_reward_scale: float = 1.0
    """eta: scale of the ground-truth rewards (rpo_*)."""
    preference_loss: str = "dpo"
    """dpo | ipo | rpo_sq | rpo_bwd_kl | rpo_fwd_kl | hinge | robust."""
    preference_loss_weight: float = 1.0
    """Weight of the preference loss."""
    sft_loss_weight: float = 0.0
    """Weight of the SFT term (negative log-likelihood of the chosen response)."""
    label_smoothing: float = 0.0
    """epsilon, the assumed rate of flipped labels, in [0, 0.5): with `dpo` conservative DPO
    (cDPO: -(1-e) log s(x) - e log s(-x), TRL's label_smoothing), with `robust` the robust loss;
    refused with the other losses."""
    log_prob_forward_micro_batch_size: Optional[int] = None
    """Micro-batch size of the reference pass: it must be model.micro_batch_size (null: that),
    so that policy and reference log-probs are bit-identical at step 0."""
    ref_log_probs: str = "on_the_fly"
    """on_the_fly: the reference pass runs for every global batch | precompute: one pass before
    training, stored on disk (keyed by the tokenized data, the reference checkpoint and the
    precision) and reused by later runs, resumes and other parallel layouts."""
    ref_log_probs_cache_dir: Optional[str] = None
    """Where precomputed reference log-probs are kept; default $DANUBE_CACHE/ref_log_probs
    (or ~/.cache/danube/ref_log_probs)."""


@dataclass
class DPODataConfig:
    data_impl: str = "jsonl"
    """jsonl (packing is `packed_sequence`, done at batch time: no offline packed files)."""
    data_prefix: Any = field(default_factory=lambda: {"train": None, "validation": None,
                                                      "test": None})
    """{train, validation, test}: JSONL files of pairs, each a path or a list; null: no such
    split. `embedded:preference` / `embedded:preference_validation` name the built-in pairs.
    A line: {"prompt", "chosen_response", "rejected_response"[, "chosen_reward",
    "rejected_reward"]} (prompt a rendered string or a list of messages, responses strings or
    assistant messages), or TRL's {"prompt", "chosen", "rejected"}."""
    seq_length: int = "${model.encoder_seq_length}"  # type: ignore[assignment]
    """Most positions of one sequence (prompt + response); a longer pair is masked out of the
    loss and of every mean, and counted."""
    default_chosen_reward: float = 1.0
    """g_c of pairs without chosen_reward (rpo_* losses)."""
    default_rejected_reward: float = 0.0
    """g_r of pairs without rejected_reward."""
    append_eod: bool = True
    """End a string-form response with the end-of-sequence token when it lacks it (message-form
    responses end with the chat template's end-of-turn token anyway); it is trained."""
    add_bos: bool = False
    """Start every sequence with the beginning-of-sequence token."""
    chat_prompt_tokens: Optional[ChatPromptTokensConfig] = None
    """Message-form records: NeMo's fixed template; null: the tokenizer's chat template, else
    H2O-Danube's."""
    packed_sequence: bool = False
    """Pack pairs into rows of 2 x seq_length (chosen and rejected of a pair in the same row,
    every sequence isolated); micro_batch_size then counts rows."""
    shuffle: bool = True
    """Reshuffle the pairs every epoch (seeded by model.seed)."""
    on_error: str = "raise"
    """raise: stop at the first bad record, naming file and line | skip: count and go on."""
    embedded_cache_dir: Optional[str] = None
    """Cache of the embedded data; default $DANUBE_CACHE or ~/.cache/danube."""


@dataclass
class DPOModelConfig(ModelConfig):
    """The architecture keys are read from the checkpoint DPO starts from (restore_from_path),
    which is also the reference policy. micro_batch_size and global_batch_size count pairs
    (unpacked; packed: micro_batch_size counts rows)."""

    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    """Preference loss and reference policy."""
    data: DPODataConfig = field(default_factory=DPODataConfig)  # type: ignore[assignment]
    """Preference pairs."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA (the reference is then the model with its adapters disabled)."""


@dataclass
class DPOConfig:
    name: str = "danube_dpo"
    """Config name, for the logs."""
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    """Run length (steps or epochs), precision, logging cadence."""
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    """Output directory, checkpoints, resume."""
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    """Starting checkpoint (= reference), parallelism, data, loss, optimizer."""
