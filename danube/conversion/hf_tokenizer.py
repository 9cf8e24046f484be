"""Tokenizer files for a Hugging Face export: tokenizer.json plus a tokenizer_config.json that
`AutoTokenizer` reads, with H2O-Danube's chat template only when the tokenizer has none; and
the special-token ids that config.json and generation_config.json carry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from danube.data.chat import DANUBE_CHAT_TEMPLATE
from danube.data.tokenizer import (
    MODEL_TOKEN_IDS_FILE,
    TOKENIZER_FILES,
    Tokenizer,
    declared_token,
)

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(tokenizer: Tokenizer, directory: Optional[Path] = None) -> dict:
    """bos/eos/pad ids for config.json, in order of authority: the ids an import recorded from
    the source model (MODEL_TOKEN_IDS_FILE), the tokens tokenizer_config.json declares, then
    our own conventions (eos = the data's end-of-document token)."""
    ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod,
           "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None}
    if directory is None:
        return ids
    config_path = directory / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for key in TOKEN_ID_KEYS:
        name = declared_token(declared, key[:-3])
        if name is not None and tokenizer.hf.token_to_id(name) is not None:
            ids[key] = tokenizer.hf.token_to_id(name)
    recorded = directory / MODEL_TOKEN_IDS_FILE
    if recorded.is_file():
        ids.update(json.loads(recorded.read_text()))
    return ids


def generation_config(directory: Path, ids: dict) -> dict:
    """The source model's generation_config.json when an import recorded it, else greedy
    decoding with our ids."""
    path = directory / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {**ids, "do_sample": False}


def write_hf_tokenizer(source_dir: Path, out_dir: Path, tokenizer: Tokenizer,
                       model_max_length: Optional[int]) -> None:
    """Copy the tokenizer files (unless out_dir is source_dir; not our own records of the
    model), completing tokenizer_config.json where keys are missing; no model_max_length for
    None. H2O-Danube's chat template goes only to a tokenizer without a template."""
    for name in TOKENIZER_FILES:
        if name in (MODEL_TOKEN_IDS_FILE, "generation_config.json"):
            continue
        if (source_dir / name).is_file() and source_dir.resolve() != out_dir.resolve():
            shutil.copy2(source_dir / name, out_dir / name)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    ids = token_ids(tokenizer, source_dir)
    names = {key: tokenizer.hf.id_to_token(value) for key, value in ids.items()
             if isinstance(value, int)}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("bos_token", names.get("bos_token_id"))
    config.setdefault("eos_token", names.get("eos_token_id"))
    config.setdefault("pad_token", names.get("pad_token_id"))
    if model_max_length is not None:
        config.setdefault("model_max_length", model_max_length)
    config.setdefault("clean_up_tokenization_spaces", False)
    if not (source_dir / "chat_template.jinja").is_file():
        config.setdefault("chat_template", DANUBE_CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2))
