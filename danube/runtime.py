"""What this process runs on: launch environment and accelerator support.

Import-light (no megatron-core), so configuration errors are reported in a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """torchrun | slurm | single."""


def launch_info() -> LaunchInfo:
    """Where this process sits, from torchrun's or SLURM's environment (else one process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)),
                          int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                          int(env["SLURM_NTASKS"]), "slurm")
    return LaunchInfo(0, 0, 1, "single")


def use_cuda(accelerator: str) -> bool:
    return accelerator != "cpu" and torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """TE installed and a CUDA device present (TE's modules need both)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


# Import-time notices from megatron-core/torch that say nothing about this run: the fallbacks
# they announce are the intended CPU path (TE/apex absent), or deprecations inside them.
_ENGINE_NOTICES = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
)


def quiet_engine_notices() -> None:
    """Hide the known-harmless engine notices (launchers call this; tests filter the same)."""
    for pattern in _ENGINE_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
