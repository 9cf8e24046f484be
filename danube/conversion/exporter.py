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
from danube.conversion.layout import GLOBALS, Geometry, hf_layer_name, mcore_to_hf_layer
from danube.data.tokenizer import load_tokenizer
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
              tokenizer_dir: Path = None) -> Path:
    """Convert; returns hf_dir. Raises ConversionError (nothing written) on bad input."""
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
                                lora_scale(ckpt / CONFIG_FILE))
        ids = token_ids(tokenizer, tokenizer_dir)
        config = hf_config_from_model(model, vocab, ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = generation_config(tokenizer_dir, ids)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(tokenizer_dir, tmp, tokenizer, model.max_position_embeddings)
    return hf_dir


def lora_scale(config_path: Path) -> float:
    """alpha / adapter_dim of a LoRA run's saved config (1.0 when it has none)."""
    from omegaconf import OmegaConf

    lora = OmegaConf.select(OmegaConf.load(config_path), "model.peft.lora_tuning")
    if lora is None:
        return 1.0
    alpha = lora.adapter_dim if lora.get("alpha") is None else lora.alpha  # null: NeMo's
    return float(alpha) / lora.adapter_dim


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
        if adapters:  # LoRA: the exported model is the merged one
            layer = merge_adapters(layer, reader.layer(index, adapters), scale)
        for key, tensor in mcore_to_hf_layer(layer, geometry).items():
            writer.add(hf_layer_name(index, key), tensor)
    writer.add(GLOBALS["decoder.final_layernorm.weight"],
               reader.tensor("decoder.final_layernorm.weight"))
    if not model.share_embeddings_and_output_weights:
        writer.add(GLOBALS["output_layer.weight"], reader.tensor("output_layer.weight")[:vocab])
    writer.finish()
    return dtype
