"""A fine-tuning run (SFT, DPO) inherits its architecture and tokenizer from the checkpoint it
starts from, as NeMo-Aligner's runs inherit them from the .nemo file: the stage's YAML holds
only what fine-tuning chooses (data, batch, optimizer, parallel layout)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from danube.config.compose import load_model_config
from danube.config.derived import ARCHITECTURE_FIELDS
from danube.paths import CONFIG_FILE, TOKENIZER_DIR, is_complete, latest_checkpoint


def start_checkpoint(path: Optional[str]) -> Optional[Path]:
    """`restore_from_path` as a checkpoint directory: a checkpoint itself, or a run directory
    (its newest complete checkpoint), or a checkpoints/ directory. None if none is there."""
    if not path:
        return None
    path = Path(path)
    if is_complete(path):
        return path
    return latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)


def from_start_checkpoint(cfg):
    """cfg with the starting checkpoint resolved, its architecture, and (unless set) its
    tokenizer. Unchanged when there is no such checkpoint: preflight reports that."""
    start = start_checkpoint(cfg.model.restore_from_path)
    if start is None or not (start / CONFIG_FILE).is_file():
        return cfg
    saved = load_model_config(start / CONFIG_FILE)
    model = replace(cfg.model, restore_from_path=str(start),
                    **{key: getattr(saved, key) for key in ARCHITECTURE_FIELDS})
    if model.tokenizer.model is None:
        model = replace(model, tokenizer=replace(model.tokenizer, library="huggingface",
                                                 model=str(start / TOKENIZER_DIR)))
    return replace(cfg, model=model)
