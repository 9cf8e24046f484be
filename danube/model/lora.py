"""LoRA adapters on megatron-core's tensor-parallel linears (after Megatron-Bridge's
`peft/lora.py` design: wrap the linear module, keep its checkpoint keys).

    y = base(x) + (alpha / r) * B(A(dropout(x)))

Tensor parallel, without extra weights per rank:
  column-parallel base (linear_qkv, linear_fc1; output split over TP): A [r, in] replicated,
      B [out/TP, r] split like the base's rows. A's output passes megatron's
      `copy_to_tensor_model_parallel_region` (all-reduce in backward), so every rank computes
      the same gradient for A.
  row-parallel base (linear_proj, linear_fc2; input split over TP): A [r, in/TP] split like
      the base's columns, its partial products summed by `reduce_from_tensor_model_parallel_
      region`; B [out, r] replicated (its gradient is the same on every rank).
A is drawn from a generator seeded by the config seed and the layer (not by the TP rank) and
then sliced, so every layout starts from the same adapters; B starts at zero, so the adapted
model starts as the base model. The base weights are frozen. Checkpoints keep the base's keys
(`...linear_qkv.weight`) and add `...linear_qkv.lora_a` / `lora_b` with their TP sharding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from danube.model_names import LORA_TARGETS


def _init(kind: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    rows, cols = tensor.shape
    if kind == "zero":
        tensor.zero_()
    elif kind == "xavier":
        bound = math.sqrt(6.0 / (rows + cols))
        tensor.uniform_(-bound, bound, generator=generator)
    elif kind == "kaiming":
        bound = 1.0 / math.sqrt(cols)
        tensor.uniform_(-bound, bound, generator=generator)
    else:  # normal
        tensor.normal_(0.0, 0.02, generator=generator)


def lora_scale_of_config(config_path) -> float:
    """alpha / adapter_dim of a LoRA run's saved config.yaml (1.0 when it has none)."""
    from omegaconf import OmegaConf

    lora = OmegaConf.select(OmegaConf.load(config_path), "model.peft.lora_tuning")
    return 1.0 if lora is None else lora_alpha(lora) / lora.adapter_dim


def lora_alpha(lora) -> float:
    """alpha, or NeMo's default for null: adapter_dim (scale 1)."""
    return float(lora.adapter_dim if lora.alpha is None else lora.alpha)


class LoRALinear(torch.nn.Module):
    """A megatron column- or row-parallel linear plus a low-rank adapter."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, dropout: float,
                 a_init: str, b_init: str, seed: int, swiglu: bool = False,
                 dropout_position: str = "pre"):
        super().__init__()
        self.base = base
        self.swiglu = swiglu  # linear_fc1 of a gated MLP: rows are [gate; up] per TP shard
        # Checkpoints name the base's entries as the unwrapped linear did (`...fc1.weight`),
        # so that megatron's own handling of them (the SwiGLU factory of MLP) applies; map
        # them onto `base.` when loading.
        self._register_load_state_dict_pre_hook(self._base_keys)
        for param in base.parameters():
            param.requires_grad = False
        self.row = isinstance(base, RowParallelLinear)
        if not self.row and not isinstance(base, ColumnParallelLinear):
            raise TypeError(f"LoRA wraps megatron's Column/RowParallelLinear, not "
                            f"{type(base).__name__} (Transformer Engine layers: not yet)")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        out_rows, in_cols = base.weight.shape  # this rank's shard
        full_in = in_cols * tp if self.row else in_cols
        generator = torch.Generator().manual_seed(seed)
        a = torch.empty(rank, full_in)
        _init(a_init, a, generator)
        if self.row:
            a = a[:, tp_rank * in_cols:(tp_rank + 1) * in_cols]
        b = torch.empty(out_rows, rank)
        _init(b_init, b, generator)  # the full B for row (replicated); a shard's rows else
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_a = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_b = torch.nn.Parameter(b.to(device=device, dtype=dtype))
        # The split adapter is a TP shard (counted on every rank by grad-norm and clipping);
        # the replicated one is counted once, as megatron does for its own replicated params.
        set_tensor_model_parallel_attributes(self.lora_a if self.row else self.lora_b, True,
                                             1 if self.row else 0, 1)
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout)
        self.post_dropout = dropout_position == "post"  # NeMo's: on the adapter's output
        self.enabled = True  # false: the base linear alone (DPO's reference policy)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)  # [s, b, out or out/TP]
        if not self.enabled:
            return out, bias
        x_in = x if self.post_dropout else self.dropout(x)
        h = torch.nn.functional.linear(x_in, self.lora_a)  # [s, b, r] (partial: row)
        h = reduce_from_tensor_model_parallel_region(h) if self.row \
            else copy_to_tensor_model_parallel_region(h)
        delta = self.scale * torch.nn.functional.linear(h, self.lora_b)  # [s, b, out(/TP)]
        return out + (self.dropout(delta) if self.post_dropout else delta), bias

    @staticmethod
    def _base_keys(state_dict, prefix, *args) -> None:
        for name in ("weight", "bias", "_extra_state"):
            if prefix + name in state_dict:
                state_dict[f"{prefix}base.{name}"] = state_dict.pop(prefix + name)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The base's entries under the unwrapped linear's keys, and the adapters sharded over
        TP like the dimension they split (B of a SwiGLU fc1 through megatron's SwiGLU factory,
        like the weight whose rows it shares, so it reshards across TP sizes)."""
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        axis = {"lora_a": 1} if self.row else {"lora_b": 0}
        state.update(make_sharded_tensors_for_checkpoint(
            adapters, prefix, axis, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=(metadata or {}).get("dp_cp_group")
            or parallel_state.get_data_parallel_group(with_context_parallel=True)))
        if self.swiglu:
            state[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(
                state[f"{prefix}lora_b"], sharded_offsets,
                (metadata or {}).get("singleton_local_shards", False))
        return state


@contextmanager
def adapters_disabled(chunks: List[torch.nn.Module]) -> Iterator[None]:
    """The base model: every adapter off inside the block (no copy of any weight)."""
    modules = lora_modules(chunks)
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def lora_modules(chunks: List[torch.nn.Module]) -> List[LoRALinear]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_and_restart(chunks: List[torch.nn.Module], scale: float,
                      fresh: List[tuple]) -> None:
    """Fold every loaded adapter into its base weight (W + scale B A, this rank's shard: the
    column-parallel B and the row-parallel A are split like W) and put back the fresh
    adapters `fresh` [(A, B)] a new run starts from."""
    from danube.model.lora_merge import merge_lora

    for module, (a, b) in zip(lora_modules(chunks), fresh):
        module.base.weight.copy_(merge_lora(module.base.weight, module.lora_a, module.lora_b,
                                            scale))
        module.lora_a.copy_(a)
        module.lora_b.copy_(b)


def add_lora(chunks: List[torch.nn.Module], lora, seed: int) -> List[torch.nn.Module]:
    """Wrap the targeted linears of every transformer layer; freeze everything else."""
    paths = list(dict.fromkeys(LORA_TARGETS[t] for t in lora.target_modules))
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad = False
        for layer in chunk.decoder.layers:
            for index, name in enumerate(paths):
                parent_name, attr = name.rsplit(".", 1)
                parent = layer.get_submodule(parent_name)
                layer_seed = seed * 100_003 + layer.layer_number * 97 + index
                swiglu = name == "mlp.linear_fc1" and chunk.config.gated_linear_unit
                setattr(parent, attr, LoRALinear(
                    getattr(parent, attr), lora.adapter_dim, lora_alpha(lora),
                    lora.adapter_dropout,
                    lora.column_init_method, lora.row_init_method, layer_seed, swiglu,
                    lora.dropout_position))
    return chunks

