"""Hugging Face Llama/Mistral -> a danube checkpoint, a pretraining config and the tokenizer.

    <out_dir>/checkpoint/   danube checkpoint (weights only), loadable with restore_from_path
    <out_dir>/tokenizer/    the tokenizer files, as they were
    <out_dir>/config.yaml   python launchers/pretrain.py --config-path <out_dir>
                            --config-name config model.data.data_prefix=[...]

Streams: the model is built on the meta device (shapes only) and each checkpoint chunk is made
from the HF tensors it needs when the writer reaches it, so memory stays near one layer.
Everything is written under a `.tmp-` sibling and renamed into place at the end: an
interrupted import leaves no <out_dir>. Every problem (unsupported architecture, missing
weights or tokenizer, an existing <out_dir>) is reported before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import List

import torch
from tqdm import tqdm

from danube.config.compose import to_yaml
from danube.config.schema import ModelConfig, PretrainConfig, TokenizerConfig
from danube.conversion import ConversionError, output_problem, staged_output
from danube.conversion.hf_config import (
    hf_config_problems,
    model_overrides_from_hf,
    read_hf_config,
)
from danube.conversion.hf_files import HFWeights
from danube.conversion.hf_tokenizer import TOKEN_ID_KEYS
from danube.conversion.layout import HF_LAYER_KEYS, Geometry, hf_chunk, hf_layer_name
from danube.data.tokenizer import MODEL_TOKEN_IDS_FILE, load_tokenizer

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
    if (problem := output_problem(out_dir)) is not None:
        problems.append(problem)
    return cfg, weights, problems


def import_config(cfg: dict, out_dir: Path) -> PretrainConfig:
    """The pretraining config that continues from the imported weights."""
    model = replace(
        ModelConfig(**model_overrides_from_hf(cfg)),
        tokenizer=TokenizerConfig(library="huggingface", model=str(out_dir / "tokenizer")),
        restore_from_path=str(out_dir / "checkpoint"),
    )
    return PretrainConfig(name=f"{out_dir.name}", model=model)


def _streaming_strategy(cfg: dict, pretrain: PretrainConfig, weights: HFWeights):
    from danube.conversion.streaming_save import OnDemandTorchDistSave

    geometry = Geometry.of(pretrain.model)
    progress = tqdm(total=len(weights.names()), desc="tensors", unit="tensor")

    def get(name: str) -> torch.Tensor:
        progress.update(1)
        return weights.get(name)

    return OnDemandTorchDistSave(lambda key, offset: hf_chunk(key, offset, get, geometry))


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Convert; returns out_dir. Raises ConversionError (nothing written) on bad input."""
    from danube.model.builder import build_model_chunks, on_meta_device, transformer_config
    from danube.paths import CheckpointMeta
    from danube.training.checkpoint import save_checkpoint
    from danube.training.distributed import single_process_world

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).resolve()
    cfg, weights, problems = _problems(hf_dir, out_dir)
    if problems:
        raise ConversionError(problems)
    first = weights.get("model.embed_tokens.weight")
    # bf16 stays bf16; fp16 widens losslessly to fp32 (we train in bf16 or fp32).
    precision = "bf16" if first.dtype == torch.bfloat16 else "32"
    pretrain = import_config(cfg, out_dir)
    m = pretrain.model
    with staged_output(out_dir) as tmp:
        # Its files as they were (chat_template.jinja and generation_config.json included),
        # and the model's special-token ids from config.json, which exports write back.
        load_tokenizer(hf_dir).save_pretrained(tmp / "tokenizer")
        ids = {key: cfg[key] for key in TOKEN_ID_KEYS if key in cfg}
        (tmp / "tokenizer" / MODEL_TOKEN_IDS_FILE).write_text(json.dumps(ids, indent=2))
        tokenizer = load_tokenizer(tmp / "tokenizer")
        with single_process_world():
            with on_meta_device():  # shapes only: the weights stream from HF into the writer
                model = build_model_chunks(m, transformer_config(m, precision, use_te=False),
                                           cfg["vocab_size"], use_te=False)[0]
            meta = CheckpointMeta(step=0, consumed_samples=0,
                                  layout={"tp": 1, "pp": 1, "vp": None, "dp": 1})
            save_checkpoint(tmp / "checkpoint", [model], meta, to_yaml(pretrain),
                            tokenizer=tokenizer,
                            sharded_strategy=_streaming_strategy(cfg, pretrain, weights))
        (tmp / "config.yaml").write_text(SCHEMA_DEFAULTS + to_yaml(pretrain))
    return out_dir
