"""Hugging Face Llama/Mistral -> a danube checkpoint, a pretraining config and the tokenizer.

    <out_dir>/checkpoint/   danube checkpoint (weights only), loadable with restore_from_path
    <out_dir>/tokenizer/    the tokenizer files, as they were
    <out_dir>/config.yaml   python launchers/pretrain.py --config-path <out_dir>
                            --config-name config model.data.data_prefix=[...]

Everything is written under a `.tmp-` sibling and renamed into place at the end: an
interrupted import leaves no <out_dir>. Every problem (unsupported architecture, missing
weights or tokenizer, an existing <out_dir>) is reported before anything is written.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import List

import torch
from tqdm import tqdm

from danube.config.compose import to_yaml
from danube.config.schema import ModelConfig, PretrainConfig, TokenizerConfig
from danube.conversion import ConversionError
from danube.conversion.hf_config import (
    hf_config_problems,
    model_overrides_from_hf,
    read_hf_config,
)
from danube.conversion.hf_files import HFWeights
from danube.conversion.layout import (
    GLOBALS,
    HF_LAYER_KEYS,
    Geometry,
    hf_layer_name,
    hf_to_mcore_layer,
)
from danube.data.tokenizer import TOKENIZER_FILES, load_tokenizer

SCHEMA_DEFAULTS = "defaults:\n  - danube_pretrain_schema\n  - _self_\n\n"


def expected_hf_names(cfg: dict) -> List[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    for layer in range(cfg["num_hidden_layers"]):
        names += [hf_layer_name(layer, key) for key in HF_LAYER_KEYS]
    return names


def _problems(hf_dir: Path, out_dir: Path):
    """(config, weights, problems): everything checked before anything is written."""
    problems, weights, cfg = [], None, {}
    try:
        cfg = read_hf_config(hf_dir)
        problems += hf_config_problems(cfg)
    except (OSError, ValueError) as error:
        problems.append(str(error))
    try:
        weights = HFWeights(hf_dir)
    except (OSError, ValueError) as error:
        problems.append(str(error))
    if weights is not None and not problems:
        expected, found = set(expected_hf_names(cfg)), set(weights.names())
        if expected - found:
            problems.append(f"weights missing from {hf_dir}: {sorted(expected - found)[:5]}")
        if found - expected:
            problems.append(f"unexpected weights in {hf_dir} (not a plain Llama/Mistral?): "
                            f"{sorted(found - expected)[:5]}")
    if not (hf_dir / "tokenizer.json").is_file():
        problems.append(f"{hf_dir} has no tokenizer.json (a SentencePiece-only tokenizer can be "
                        "converted with transformers' AutoTokenizer(...).save_pretrained)")
    if out_dir.exists() and any(out_dir.iterdir()):
        problems.append(f"{out_dir} exists and is not empty: choose a new output directory")
    return cfg, weights, problems


def import_config(cfg: dict, out_dir: Path) -> PretrainConfig:
    """The pretraining config that continues from the imported weights."""
    model = replace(
        ModelConfig(**model_overrides_from_hf(cfg)),
        tokenizer=TokenizerConfig(library="huggingface", model=str(out_dir / "tokenizer")),
        restore_from_path=str(out_dir / "checkpoint"),
    )
    return PretrainConfig(name=f"{out_dir.name}", model=model)


def _fill_layer(layer_module, tensors: dict) -> None:
    """Copy megatron-layout tensors into a local-spec TransformerLayer's parameters."""
    attention, mlp = layer_module.self_attention, layer_module.mlp
    targets = {
        "self_attention.linear_qkv.layer_norm_weight": layer_module.input_layernorm.weight,
        "self_attention.linear_qkv.weight": attention.linear_qkv.weight,
        "self_attention.linear_proj.weight": attention.linear_proj.weight,
        "mlp.linear_fc1.layer_norm_weight": layer_module.pre_mlp_layernorm.weight,
        "mlp.linear_fc1.weight": mlp.linear_fc1.weight,
        "mlp.linear_fc2.weight": mlp.linear_fc2.weight,
    }
    for key, param in targets.items():
        _copy(param, tensors[key], key)


def _copy(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ConversionError([f"{name}: shape {tuple(tensor.shape)} does not fit "
                               f"{tuple(param.shape)}"])
    with torch.no_grad():
        param.copy_(tensor)


def _build_and_fill(pretrain: PretrainConfig, cfg: dict, weights: HFWeights, precision: str):
    from danube.model.builder import build_model_chunks, transformer_config

    m = pretrain.model
    config = transformer_config(m, precision, use_te=False)
    config.perform_initialization = False  # every weight is overwritten below
    model = build_model_chunks(m, config, cfg["vocab_size"], use_te=False)[0]
    geometry = Geometry(m.hidden_size, m.num_attention_heads, m.num_query_groups,
                        m.kv_channels or m.hidden_size // m.num_attention_heads)
    _copy(model.embedding.word_embeddings.weight, weights.get(GLOBALS[
        "embedding.word_embeddings.weight"]), "embedding")
    for index in tqdm(range(m.num_layers), desc="layers", unit="layer"):
        hf = {key: weights.get(hf_layer_name(index, key)) for key in HF_LAYER_KEYS}
        _fill_layer(model.decoder.layers[index], hf_to_mcore_layer(hf, geometry))
    _copy(model.decoder.final_layernorm.weight, weights.get("model.norm.weight"), "final norm")
    if not m.share_embeddings_and_output_weights:
        _copy(model.output_layer.weight, weights.get("lm_head.weight"), "lm_head")
    return model


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Convert; returns out_dir. Raises ConversionError (nothing written) on bad input."""
    from danube.conversion.mcore_files import single_process_world
    from danube.training.checkpoint import save_checkpoint
    from danube.training.checkpoint_dirs import CheckpointMeta

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).resolve()
    cfg, weights, problems = _problems(hf_dir, out_dir)
    if problems:
        raise ConversionError(problems)
    first = weights.get("model.embed_tokens.weight")
    # bf16 stays bf16; fp16 widens losslessly to fp32 (we train in bf16 or fp32).
    precision = "bf16" if first.dtype == torch.bfloat16 else "32"
    pretrain = import_config(cfg, out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, tmp / "tokenizer" / name)
    tokenizer = load_tokenizer(tmp / "tokenizer")
    with single_process_world():
        model = _build_and_fill(pretrain, cfg, weights, precision)
        meta = CheckpointMeta(step=0, consumed_samples=0, layout={"tp": 1, "pp": 1, "vp": None,
                                                                  "dp": 1})
        save_checkpoint(tmp / "checkpoint", [model], meta, to_yaml(pretrain), tokenizer=tokenizer)
    (tmp / "config.yaml").write_text(SCHEMA_DEFAULTS + to_yaml(pretrain))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    tmp.rename(out_dir)
    return out_dir
