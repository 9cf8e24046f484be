"""Run megatron-core on a CPU-only PyTorch (gloo), so CI exercises the real engine.

megatron-core 0.16 assumes CUDA in a handful of places. `apply()` installs the torch-level
shims below, and only when CUDA is absent; on a GPU it does nothing. Every patch is listed
here, and `tests/test_cpu_compat.py` fails loudly if megatron-core changes under one of them
(see ../shared/notes/megatron-core-on-cpu.md for how each was found).

Patches (all undone by `remove()`):
  1. `torch.cuda.current_device()` -> "cpu". RoPE, the global memory buffer, the pipeline
     p2p shape exchange and the optimizer put tensors on "the current device".
  2. `torch.cuda.get_rng_state` / `set_rng_state` (and their `torch.cuda.random` twins) and
     megatron's `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the
     CPU generator. The RNG tracker forks "cuda" generator states for TP-local init/dropout.
  3. `torch.cuda.manual_seed` -> `torch.manual_seed`. Without it a CPU torch queues the
     call lazily and nothing is seeded. (`manual_seed_all` is left alone: `torch.manual_seed`
     itself calls it.)
  4. `torch.cuda.synchronize` -> no-op (the pipeline schedules call it with batched p2p).
  5. A `TorchFunctionMode`, entered once and kept active, that
     a. rewrites `device="cuda"` (any cuda device) to CPU in tensor factories, `.to(...)`,
        and turns `.cuda()` into a no-op: hard-coded CUDA devices exist in the mask builders
        (`transformer/utils.py`), the optimizer, grad clipping, `utils.py`, the schedules;
     b. makes `Tensor.type()` without arguments report `torch.cuda.<X>Tensor` for CPU
        tensors: the mixed-precision and distributed optimizers and grad clipping classify
        parameters by that string.
  6. The warning "CPU RNG state changed within GPU RNG context" from the RNG tracker is
     filtered: on CPU the "GPU" generator *is* the CPU one, so every fork that draws
     random numbers (weight init, dropout) would log it.
  7. `torch.cuda.Event` -> a wall-clock event (`record`, `synchronize`, `elapsed_time` in
     ms). The inference engine's text-generation controller times every step with CUDA
     events; a CPU torch raises "Tried to instantiate dummy base class Event".

torch keeps function modes per thread: patch 5 is active in the thread that called `apply()`
only. Code that runs megatron in another thread (the HTTP server's engine thread) enters
`in_this_thread()` there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}
_RNG_LOGGER = "megatron.core.tensor_parallel.random"
_saved: dict = {}
_mode: TorchFunctionMode | None = None
_mode_thread: int | None = None  # the thread that entered it


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare GPU index


class _CpuDeviceMode(TorchFunctionMode):
    """Patch 5: CUDA devices -> CPU, `Tensor.type()` reports CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DropForkWarning(logging.Filter):
    """Patch 6."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


class _WallClockEvent:
    """Patch 7."""

    def __init__(self, *_args, **_kwargs):
        self.time = None

    def record(self, *_args, **_kwargs) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return (end.time - self.time) * 1000.0


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def is_applied() -> bool:
    return _mode is not None


def _targets() -> list:
    """(owner, attribute, replacement) of patches 1-4 and 7, in docstring order."""
    from megatron.core.tensor_parallel import random as mcore_random

    return [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "get_rng_state", _cpu_rng_state),
        (torch.cuda, "set_rng_state", _set_cpu_rng_state),
        (torch.cuda.random, "get_rng_state", _cpu_rng_state),
        (torch.cuda.random, "set_rng_state", _set_cpu_rng_state),
        (mcore_random, "_get_cuda_rng_state", _cpu_rng_state),
        (mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state),
        (torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "Event", _WallClockEvent),
    ]


def apply() -> bool:
    """Install the patches if CUDA is absent. Idempotent. Returns whether they are active."""
    global _mode, _mode_thread
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    for owner, name, replacement in _targets():
        _saved[(owner, name)] = getattr(owner, name)  # AttributeError if megatron renamed it
        setattr(owner, name, replacement)
    _saved["filter"] = _DropForkWarning()
    logging.getLogger(_RNG_LOGGER).addFilter(_saved["filter"])
    _mode = _CpuDeviceMode()
    _mode.__enter__()
    _mode_thread = threading.get_ident()
    return True


@contextlib.contextmanager
def in_this_thread() -> Iterator[None]:
    """Patch 5 in the calling thread too, while the block runs (nothing when not applied)."""
    if _mode is None or _mode_thread == threading.get_ident():
        yield
        return
    with _CpuDeviceMode():
        yield


def remove() -> None:
    """Undo `apply()` (used by the tests)."""
    global _mode, _mode_thread
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode, _mode_thread = None, None
    logging.getLogger(_RNG_LOGGER).removeFilter(_saved.pop("filter"))
    for (owner, name), original in _saved.items():
        setattr(owner, name, original)
    _saved.clear()
