"""What this process runs on: launch environment and accelerator support.

Import-light (no megatron-core), so configuration errors are reported in a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """torchrun | slurm | single | slurm-batch (a plain `python` in the batch script of a
    multi-task allocation: refused by preflight, it would wait for peers that never come)."""


def launch_info() -> LaunchInfo:
    """Where this process sits, from torchrun's or SLURM's environment (else one process).
    A SLURM task started by srun has SLURM_STEP_ID; the batch script of an allocation has
    SLURM_PROCID=0 and SLURM_NTASKS too, but no step."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)),
                          int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        tasks = int(env["SLURM_NTASKS"])
        if "SLURM_STEP_ID" not in env:
            return LaunchInfo(0, 0, 1, "single") if tasks == 1 else \
                LaunchInfo(0, 0, tasks, "slurm-batch")
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), tasks,
                          "slurm")
    return LaunchInfo(0, 0, 1, "single")


def hide_cuda_for(accelerator: str) -> None:
    """trainer.accelerator=cpu on a machine with GPUs: hide them from this process before
    anything asks CUDA, so every later decision (gloo, the CPU shims, the local spec, no
    batched p2p) is the CPU one and no CUDA call is made. Launchers call this first."""
    if accelerator != "cpu":
        return
    if torch.cuda.is_initialized():
        raise RuntimeError("trainer.accelerator=cpu: CUDA was initialised before the launcher "
                           "could hide it; set CUDA_VISIBLE_DEVICES= yourself")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pop_dry_run(argv: list) -> int:
    """Remove `--dry-run N` from argv (Hydra would refuse it); N, or 0 when absent."""
    if "--dry-run" not in argv:
        return 0
    at = argv.index("--dry-run")
    given = at + 1 < len(argv) and argv[at + 1].isdigit()
    value = int(argv[at + 1]) if given else 2
    del argv[at:at + (2 if given else 1)]
    return value


def use_cuda(accelerator: str) -> bool:
    return accelerator != "cpu" and torch.cuda.is_available()


def cpu_capability() -> str:
    """ATen's vector capability of this CPU (AVX2, AVX512, SVE256, DEFAULT...)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX tiles). Elsewhere
    torch emulates bf16 GEMMs: ~60x slower than fp32 for a 1024x1024 matmul on an AVX2-only
    AMD EPYC (43 ms fp32, 2,580 ms bf16), so a training step is ~36x slower."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # no probe we trust on Arm yet: fp32 is the safe choice
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """What runs: 32 | bf16-mixed (auto resolved; explicit values kept as given)."""
    reason: str
    """Why, in a few words (for the launch line and the saved config)."""
    warning: Optional[str] = None
    """One line to print when an explicit choice will be slow on this machine."""


def resolve_precision(requested: str, cuda: bool,
                      native_bf16: Optional[bool] = None) -> PrecisionChoice:
    """`trainer.precision` -> what runs here. auto: bf16-mixed on CUDA and on CPUs with native
    bf16, fp32 elsewhere. An explicit bf16 on a CPU without native bf16 runs, with a warning.
    `native_bf16` defaults to this CPU's probe (tests pass it)."""
    requested = str(requested)
    native = True
    if cuda:
        where = "CUDA"
    else:
        native = cpu_native_bf16() if native_bf16 is None else native_bf16
        where = (f"CPU {cpu_capability()} "
                 f"{'with' if native else 'without'} native bf16 (AVX512-BF16/AMX)")
    if requested != "auto":
        warning = None
        if requested not in ("32", "32-true") and not native:
            warning = (f"trainer.precision={requested} on a {where}: bf16 matmuls are emulated, "
                       "expect training ~30x slower than trainer.precision=32 (auto picks 32 "
                       "here)")
        return PrecisionChoice(requested, f"as configured, on {where}", warning)
    if cuda or native:
        return PrecisionChoice("bf16-mixed", f"auto: {where}")
    return PrecisionChoice("32", f"auto: {where}, where bf16 would be emulated ~30x slower")


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
