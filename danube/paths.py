"""Where a run's files live, and which checkpoints exist and are complete.

Filesystem only (no megatron-core, nothing from config/ or training/), so the launch
preflight, the training loop and the converters share it cheaply. See
`danube.training.checkpoint` for the checkpoint layout and the atomic save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

META_FILE = "danube_checkpoint.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@dataclass
class CheckpointMeta:
    step: int
    consumed_samples: int
    val_loss: Optional[float] = None
    layout: dict = field(default_factory=dict)
    """Parallel layout it was saved with (informational: loading reshards)."""
    optimizer_sharding: Optional[str] = None
    """distrib_optim_sharding_type of the distributed optimizer state, if any."""
    saved_at: float = 0.0
    data_plan: Optional[dict] = None
    """What fixed the training order (danube.training.data_plan); None before it was kept."""


def exp_dir(exp_manager) -> Path:
    """<exp_dir>/<name> of an `exp_manager` section: the run's directory."""
    return Path(exp_manager.exp_dir) / exp_manager.name


def checkpoint_root(exp_manager) -> Path:
    return exp_dir(exp_manager) / "checkpoints"


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / META_FILE).is_file()


def read_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((path / META_FILE).read_text()))


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(_PREFIX) and is_complete(path):
            try:
                found.append((int(path.name[len(_PREFIX):]), path))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# What megatron-core's torch_dist format always writes, besides the .distcp shards.
_DIST_FILES = ("metadata.json", "common.pt", ".metadata")


def checkpoint_problem(path: Path) -> Optional[str]:
    """What makes a complete-looking checkpoint unloadable, or None (files only, cheap)."""
    try:
        meta = read_meta(path)
        if not isinstance(meta.step, int) or not isinstance(meta.consumed_samples, int):
            raise TypeError("step and consumed_samples must be integers")
    except (OSError, ValueError, TypeError) as error:
        return f"{path / META_FILE} is unreadable ({error})"
    missing = [name for name in (*_DIST_FILES, CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}: not a whole danube checkpoint"
    return None


def checkpoint_tensor_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every tensor in a checkpoint, from its DCP metadata (no tensor read).
    Keys are megatron-core's sharded keys, e.g. `embedding.word_embeddings.weight`."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key: tuple(item.size) for key, item in metadata.items() if hasattr(item, "size")}
