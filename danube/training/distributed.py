"""Process-group set-up from torchrun, SLURM, or a plain `python` launch.

NCCL on GPU, gloo on CPU (with `danube.cpu_compat` applied, so megatron-core runs as is).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from danube import cpu_compat
from danube.config.schema import ModelConfig
from danube.runtime import LaunchInfo, launch_info, use_cuda


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(model: ModelConfig, accelerator: str) -> LaunchInfo:
    """torch.distributed + megatron-core's parallel groups + seeds."""
    info = launch_info()
    cuda = use_cuda(accelerator)
    if cuda:
        # modulo: sites binding one GPU per task (--gpus-per-task, --gpu-bind) show each
        # task only its own device 0; otherwise every task sees all the node's GPUs
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.apply()
    # One process has nobody to meet: a fresh local port, never an inherited MASTER_PORT
    # (which a parent process may be using).
    init_method = f"tcp://127.0.0.1:{_free_port()}" if info.launcher == "single" else "env://"
    if info.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("under SLURM, export MASTER_ADDR (the first node's host name) and "
                           "MASTER_PORT before srun; see launchers/slurm/pretrain.sbatch")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=30),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=model.virtual_pipeline_model_parallel_size,
        context_parallel_size=model.context_parallel_size,
    )
    set_seed(model.seed)
    return info


def set_seed(seed: int) -> None:
    """Megatron-LM's scheme: one seed per pipeline stage; TP ranks get their own stream
    through the RNG tracker for tensor-parallel weights and dropout."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def single_process_world(accelerator: str = "cpu") -> Iterator[None]:
    """megatron-core's parallel state for this one process (TP = PP = 1; gloo on CPU, NCCL
    on CUDA), torn down on exit: for building a GPTModel outside a launch (conversion,
    evaluation, generation)."""
    init_distributed(ModelConfig(), accelerator)
    try:
        yield
    finally:
        shutdown()
