"""Tokenizer files for a Hugging Face export: tokenizer.json plus a tokenizer_config.json that
`AutoTokenizer` reads, with H2O-Danube's chat template when the tokenizer has none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from danube.data.tokenizer import TOKENIZER_FILES, Tokenizer

# anchors.md: <|system|>{sys}</s> (optional) <|prompt|>{user}</s><|answer|>{assistant}</s>;
# the generation prompt ends with <|answer|>.
DANUBE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|prompt|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|answer|>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|answer|>' }}{% endif %}"
)


def token_ids(tokenizer: Tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod,
            "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None}


def write_hf_tokenizer(source_dir: Path, out_dir: Path, tokenizer: Tokenizer,
                       model_max_length: Optional[int]) -> None:
    """Copy the tokenizer files (unless out_dir is source_dir), completing
    tokenizer_config.json where keys are missing; no model_max_length for None."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file() and source_dir.resolve() != out_dir.resolve():
            shutil.copy2(source_dir / name, out_dir / name)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    names = {key: tokenizer.hf.id_to_token(value) for key, value in token_ids(tokenizer).items()
             if value is not None}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("bos_token", names.get("bos_token_id"))
    config.setdefault("eos_token", names.get("eos_token_id"))
    config.setdefault("pad_token", names.get("pad_token_id"))
    if model_max_length is not None:
        config.setdefault("model_max_length", model_max_length)
    config.setdefault("clean_up_tokenization_spaces", False)
    config.setdefault("chat_template", DANUBE_CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2))
