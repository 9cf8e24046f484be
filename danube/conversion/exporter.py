"""A danube checkpoint (any TP/PP layout) -> a Hugging Face directory that
`AutoModelForCausalLM.from_pretrained` loads with no code of ours.

Streams: one layer is read from the checkpoint at a time and safetensors shards are written
as they fill, so memory stays near one shard plus one layer. Written under a `.tmp-` sibling
and renamed at the end: an interrupted export leaves no <hf_dir>.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from danube.config.compose import load_model_config
from danube.conversion import ConversionError, output_problem, staged_output
from danube.conversion.hf_config import export_problems, hf_config_from_model
from danube.conversion.hf_files import ShardedSafetensorsWriter
from danube.conversion.hf_tokenizer import generation_config, token_ids, write_hf_tokenizer
from danube.conversion.layout import (
    GLOBALS,
    Geometry,
    hf_layer_name,
    mcore_to_hf_layer,
    split_qkv,
)
from danube.data.tokenizer import load_tokenizer
from danube.model.lora import lora_alpha
from danube.model.lora import lora_scale_of_config as lora_scale
from danube.model.lora_merge import merge_lora
from danube.paths import CONFIG_FILE, TOKENIZER_DIR, checkpoint_problem

_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def _problems(ckpt: Path, hf_dir: Path, tokenizer_dir: Path):
    problems, model = [], None
    problem = checkpoint_problem(ckpt) if ckpt.is_dir() else f"{ckpt} is not a directory"
    if problem:
        problems.append(f"{problem} (give a checkpoint directory, e.g. "
                        "results/<name>/checkpoints/step_00000100)")
    else:
        model = load_model_config(ckpt / CONFIG_FILE)
        problems += export_problems(model)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        problems.append(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer <directory>")
    if (problem := output_problem(hf_dir)) is not None:
        problems.append(problem)
    return model, problems


def export_hf(ckpt: Path, hf_dir: Path, max_shard_bytes: int = 5 * 2**30,
              tokenizer_dir: Path = None, merge: bool = True) -> Path:
    """Convert; returns hf_dir. Raises ConversionError (nothing written) on bad input.
    `merge=False` (a LoRA run's checkpoint): the base weights alone, for `export_adapter`'s
    adapter to load onto."""
    from danube.conversion.mcore_files import DistCheckpointReader

    ckpt, hf_dir = Path(ckpt), Path(hf_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else ckpt / TOKENIZER_DIR
    model, problems = _problems(ckpt, hf_dir, tokenizer_dir)
    if problems:
        raise ConversionError(problems)
    tokenizer = load_tokenizer(tokenizer_dir)
    with staged_output(hf_dir) as tmp:
        reader = DistCheckpointReader(ckpt)
        # The model's own rows (an imported config.json may have more than its tokenizer);
        # only megatron's padding beyond them is dropped.
        vocab = model.vocab_size or tokenizer.vocab_size
        dtype = _stream_weights(reader, model, vocab, tmp, max_shard_bytes,
                                lora_scale(ckpt / CONFIG_FILE) if merge else None)
        ids = token_ids(tokenizer, tokenizer_dir)
        config = hf_config_from_model(model, vocab, ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = generation_config(tokenizer_dir, ids)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(tokenizer_dir, tmp, tokenizer, model.max_position_embeddings)
    return hf_dir


# megatron's adapted linear -> the HF modules it feeds (PEFT target names) and how B's rows
# split between them (A is shared: each HF module gets the same A and its rows of B).
PEFT_MODULES = {
    "self_attention.linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("self_attn", ("o_proj",)),
    "mlp.linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("mlp", ("down_proj",)),
}


def peft_layer_adapters(adapters: dict, g: Geometry, layer: int) -> dict:
    """One layer's adapters (megatron layout, full tensors) in PEFT's names: W + s B A of a
    fused linear is, row block by row block, W_i + s B_i A, so q/k/v (de-interleaved from
    megatron's per-group order, as the weight is) and gate/up each get their block of B and
    the shared A. Exact: the PEFT model computes the merged export's weights."""
    out = {}
    for module, (parent, names) in PEFT_MODULES.items():
        if f"{module}.lora_a" not in adapters:
            continue
        a, b = adapters[f"{module}.lora_a"], adapters[f"{module}.lora_b"]
        if module.endswith("linear_qkv"):
            blocks = split_qkv(b, g)
        elif module.endswith("linear_fc1"):
            blocks = torch.chunk(b, 2, dim=0)
        else:
            blocks = (b,)
        for name, block in zip(names, blocks):
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            out[f"{prefix}.lora_A.weight"] = a.clone().contiguous()  # own storage each
            out[f"{prefix}.lora_B.weight"] = block.clone().contiguous()
    return out


def export_adapter(ckpt: Path, out_dir: Path) -> Path:
    """A LoRA run's adapters as a Hugging Face PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors) that `PeftModel.from_pretrained` loads onto the base export
    (`export_hf(..., merge=False)` of the same checkpoint, or of the checkpoint the run
    started from). Raises ConversionError (nothing written) on bad input."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from danube.conversion.mcore_files import DistCheckpointReader

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    problems = [] if (ckpt / CONFIG_FILE).is_file() else [f"{ckpt} has no {CONFIG_FILE}"]
    if out_dir.exists():
        problems.append(f"{out_dir} exists: give a new directory")
    lora = OmegaConf.select(OmegaConf.load(ckpt / CONFIG_FILE), "model.peft.lora_tuning") \
        if not problems else None
    reader = DistCheckpointReader(ckpt) if not problems else None
    if not problems and (lora is None or not reader.adapter_keys()):
        problems.append(f"{ckpt} holds no LoRA adapters (not written by a model.peft.peft_"
                        "scheme=lora run): export it whole without --adapter-only")
    if problems:
        raise ConversionError(problems)
    model = load_model_config(ckpt / CONFIG_FILE)
    geometry, keys = Geometry.of(model), reader.adapter_keys()
    tensors = {}
    for index in range(reader.num_layers):
        tensors.update(peft_layer_adapters(reader.layer(index, keys), geometry, index))
    targets = sorted({k.split(".")[-3] for k in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora.adapter_dim),
              "lora_alpha": lora_alpha(lora), "lora_dropout": float(lora.adapter_dropout),
              "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "modules_to_save": None,
              "base_model_name_or_path": None}
    with staged_output(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def merge_adapters(layer: dict, adapters: dict, scale: float) -> dict:
    """W + scale * B A for every adapted linear of one layer (megatron layout, full tensors)."""
    merged = dict(layer)
    for key in {k.rsplit(".", 1)[0] for k in adapters}:
        merged[f"{key}.weight"] = merge_lora(layer[f"{key}.weight"], adapters[f"{key}.lora_a"],
                                             adapters[f"{key}.lora_b"], scale)
    return merged


def _stream_weights(reader, model, vocab: int, out_dir: Path, max_shard_bytes: int,
                    scale: float) -> str:
    """Write every weight in HF names and order; returns the dtype name."""
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    if reader.num_layers != model.num_layers:
        raise ConversionError([f"checkpoint has {reader.num_layers} layers, its config says "
                               f"{model.num_layers}"])
    embedding = reader.tensor("embedding.word_embeddings.weight")
    writer.add(GLOBALS["embedding.word_embeddings.weight"], embedding[:vocab])  # drop padding
    dtype = _DTYPES[embedding.dtype]
    del embedding
    geometry = Geometry.of(model)
    adapters = reader.adapter_keys()
    for index in tqdm(range(model.num_layers), desc="layers", unit="layer"):
        layer = reader.layer(index)
        if adapters and scale is not None:  # LoRA: the exported model is the merged one
            layer = merge_adapters(layer, reader.layer(index, adapters), scale)
        for key, tensor in mcore_to_hf_layer(layer, geometry).items():
            writer.add(hf_layer_name(index, key), tensor)
    writer.add(GLOBALS["decoder.final_layernorm.weight"],
               reader.tensor("decoder.final_layernorm.weight"))
    if not model.share_embeddings_and_output_weights:
        writer.add(GLOBALS["output_layer.weight"], reader.tensor("output_layer.weight")[:vocab])
    writer.finish()
    return dtype
