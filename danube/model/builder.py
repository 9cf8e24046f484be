"""Everything that constructs the model: schema -> TransformerConfig -> ModuleSpec -> GPTModel.

Model construction lives in this one module so that a later move (megatron-core is
deprecating `GPTModel` for `HybridModel`) is a one-file change. The backend (Transformer
Engine, megatron-core local, our SDPA or FlexAttention, fusions, batched p2p) is chosen in
`backend` alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.overrides import TorchFunctionMode

from danube.config.derived import padded_vocab_size
from danube.config.schema import ModelConfig
from danube.model.attention import FlexAttention, SDPAttention
from danube.model.norm import norm_class
from danube.runtime import transformer_engine_available

_ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "fast-swiglu": (F.silu, True),
    "gelu": (F.gelu, False),
    "squared-relu": (squared_relu, False),
}
_TE_ATTENTION = {"auto": AttnBackend.auto, "flash": AttnBackend.flash,
                 "fused": AttnBackend.fused, "unfused": AttnBackend.unfused}


def uses_transformer_engine(model: ModelConfig) -> bool:
    """The TE layer spec runs when asked for and available; otherwise the local spec."""
    return model.transformer_engine and transformer_engine_available()


@dataclass(frozen=True)
class Backend:
    """Every backend decision, made in `backend` alone."""

    te_layers: bool
    """Transformer Engine's layer spec (fused norm+linear, FP8), else megatron's local one."""
    core_attention: Optional[type]
    """Our replacement core attention, or None for TE's own (flash / fused / unfused)."""
    fusions: bool
    """Fused softmax, bias-dropout-add and RoPE kernels (TE/apex on CUDA only)."""
    batch_p2p: bool
    """Batched pipeline p2p: NCCL only (on gloo it silently corrupts the interleaved
    schedule, ../shared/notes/megatron-core-on-cpu.md)."""
    activation_fusion: bool
    """megatron's fused (bias-)SwiGLU/GeLU (`model.bias_activation_fusion`), CUDA only."""
    cross_entropy_fusion: bool
    """megatron's fused vocab-parallel cross-entropy (`model.cross_entropy_loss_fusion`)."""
    grad_accumulation_fusion: bool
    """Weight-gradient GEMM fused into the main-grad accumulation: TE's linears do it, and
    megatron's own (the LM head) need apex's fused_weight_gradient_mlp_cuda."""


_OUR_ATTENTION = {"sdpa": SDPAttention, "flex": FlexAttention, "local": DotProductAttention}


def backend(model: ModelConfig, use_te: bool, cuda: Optional[bool] = None) -> Backend:
    """The one place a backend is chosen. `use_te`: TE requested and usable here
    (`uses_transformer_engine`); `cuda`: a GPU trains (default: CUDA visible). Attention:
    TE's own with TE unless sdpa/flex/local is asked for; without TE, `auto` is FlexAttention
    on a GPU (the window's blocks only; it has no dropout) and SDPA on a CPU. Each fusion
    applies where its kernel exists; off elsewhere, whatever the config asks."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    name = model.attention_backend
    if use_te and name not in _OUR_ATTENTION:
        attention = None
    elif name == "auto":
        attention = FlexAttention if cuda and model.attention_dropout == 0 else SDPAttention
    else:
        attention = _OUR_ATTENTION[name]
    gated = _ACTIVATIONS[model.activation][1]
    return Backend(
        te_layers=use_te, core_attention=attention, fusions=use_te, batch_p2p=cuda,
        activation_fusion=(model.bias_activation_fusion and cuda
                           and model.activation != "squared-relu" and (gated or model.bias)),
        cross_entropy_fusion=(model.cross_entropy_loss_fusion and cuda
                              and (model.cross_entropy_fusion_impl == "native" or use_te)),
        grad_accumulation_fusion=(model.gradient_accumulation_fusion and use_te and cuda
                                  and importlib.util.find_spec("fused_weight_gradient_mlp_cuda")
                                  is not None),
    )


def megatron_window(window_size: Optional[int]) -> Optional[tuple]:
    """HF `sliding_window=W` (W keys, the query included) -> megatron's inclusive (W-1, 0)."""
    return None if window_size is None else (window_size - 1, 0)


def transformer_config(model: ModelConfig, precision: str, use_te: bool) -> TransformerConfig:
    """The one mapping from our schema to megatron-core's TransformerConfig."""
    bf16 = precision != "32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    activation, gated = _ACTIVATIONS[model.activation]
    chosen = backend(model, use_te)
    fp8_format = ("e4m3" if model.fp8_e4m3 else "hybrid") if model.fp8 else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=model.virtual_pipeline_model_parallel_size,
        context_parallel_size=model.context_parallel_size,
        cp_comm_type=model.cp_comm_type,
        sequence_parallel=model.sequence_parallel,
        normalization="RMSNorm" if model.normalization == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=model.bias,
        add_qkv_bias=model.bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        window_size=megatron_window(model.window_size),
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        fp8=fp8_format,
        fp8_recipe=model.fp8_recipe,
        fp8_margin=model.fp8_margin,
        fp8_interval=model.fp8_interval,
        fp8_amax_history_len=model.fp8_amax_history_len,
        fp8_amax_compute_algo=model.fp8_amax_compute_algo,
        recompute_granularity=model.activations_checkpoint_granularity,
        recompute_method=model.activations_checkpoint_method,
        recompute_num_layers=model.activations_checkpoint_num_layers,
        # TE reads its backend from NVTE_* variables that GPTModel sets from this; sdpa and
        # local replace the core attention in `layer_spec` instead.
        attention_backend=_TE_ATTENTION.get(model.attention_backend, AttnBackend.auto),
        masked_softmax_fusion=chosen.fusions,
        bias_activation_fusion=chosen.activation_fusion,
        cross_entropy_loss_fusion=chosen.cross_entropy_fusion,
        cross_entropy_fusion_impl=model.cross_entropy_fusion_impl,
        bias_dropout_fusion=chosen.fusions,
        apply_rope_fusion=chosen.fusions,
        persist_layer_norm=False,
        gradient_accumulation_fusion=chosen.grad_accumulation_fusion,
        batch_p2p_comm=chosen.batch_p2p,
    )


def layer_spec(model: ModelConfig, config: TransformerConfig, use_te: bool, vp_stage=None):
    """The layer spec of `backend`'s choice: TE's fused layers, or megatron's local layers
    with our norms; either with our core attention where `backend` picked one."""
    chosen = backend(model, use_te)
    if chosen.te_layers:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        if chosen.core_attention is not None:
            spec.submodules.self_attention.submodules.core_attention = chosen.core_attention
        return spec
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    norm = norm_class(config.normalization)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    spec.submodules.self_attention.submodules.core_attention = chosen.core_attention
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm)


def build_model_chunks(
    model: ModelConfig, config: TransformerConfig, vocab_size: int, use_te: bool, peft=None
) -> List[GPTModel]:
    """This rank's GPTModel chunks: one, or one per virtual pipeline stage; with a `peft`
    section asking for LoRA, adapters on its target linears and the rest frozen."""
    num_chunks = model.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for chunk in range(num_chunks):
        vp_stage = chunk if num_chunks > 1 else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=layer_spec(model, config, use_te, vp_stage),
                vocab_size=padded_vocab_size(vocab_size, model),
                max_sequence_length=model.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
                position_embedding_type=model.position_embedding_type,
                rotary_percent=model.rotary_percentage,
                rotary_base=model.rotary_base,
                vp_stage=vp_stage,
            )
        )
    if peft is not None and peft.peft_scheme == "lora":
        from danube.model.lora import add_lora

        add_lora(chunks, peft.lora_tuning, model.seed)
    return chunks


class _ForceDevice(TorchFunctionMode):
    """Send every explicit `device=` to one device (megatron passes explicit devices)."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device():
    """Build modules without allocating: shapes only (1.8B layouts checked on CPU)."""
    with torch.device("meta"), _ForceDevice("meta"):
        yield
