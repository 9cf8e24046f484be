"""Distributed checkpoints (megatron-core dist_checkpointing) with atomic commits.

Layout under <exp_dir>/<name>/checkpoints:
    step_00000100/            a complete checkpoint: the dist_checkpointing files,
        danube_checkpoint.json    step, consumed samples, val loss, parallel layout
        config.yaml               the fully resolved config of the run
        tokenizer/                the tokenizer files (the checkpoint is self-contained)
    .tmp-step_00000100/       a save in progress (never loaded)

A save writes into the temporary directory, then rank 0 writes danube_checkpoint.json last
and renames the directory into place: a killed save leaves only a .tmp- directory, and the
newest complete checkpoint stays what `resume_if_exists` picks up.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
from megatron.core.utils import unwrap_model

from danube.paths import (
    CONFIG_FILE,
    META_FILE,
    TMP_PREFIX,
    TOKENIZER_DIR,
    CheckpointMeta,
    list_checkpoints,
    read_meta,
)
from danube.training.engine import inner_torch_optimizers


def _rng_state() -> ShardedObject:
    """Megatron-LM's RNG checkpoint: one object per (PP, TP) rank, DP replicas identical."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    ranks = (parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", [state], (pp, tp), ranks,
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng_state(obj) -> None:
    state = obj[0]
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_metadata(distributed_optimizer: bool) -> dict:
    """What Megatron-LM passes to `sharded_state_dict` (dp_reshardable: the one format that
    saves *and* loads the distributed optimizer without TE/apex)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    if distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    return metadata


def _state_keys(model: List) -> List[str]:
    """Megatron-LM's names: "model", or "model0", "model1"... for virtual pipeline chunks."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def model_sharded_state_dict(model: List, metadata: dict) -> dict:
    """Sharded state of the GPTModels inside the DDP / Float16Module wrappers."""
    return {key: unwrap_model(chunk).sharded_state_dict(metadata=metadata)
            for key, chunk in zip(_state_keys(model), model)}


def _init_adam_states(optimizer) -> None:
    """megatron-core 0.16's distributed optimizer, on torch's AdamW (no TE/apex), reads a
    `step` from every parameter state to build its state dict, even for loading: give a
    fresh optimizer zero states first (a no-op once it has stepped)."""
    for inner in inner_torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)


def _restore_adam_steps(optimizer, loaded_state: dict) -> None:
    """The same optimizer's load restores `step` wrongly: the value copied in from its
    bucket-space state is 0, and one tensor is shared by every parameter (torch's AdamW
    increments it in place once per parameter). Either way every resumed update after the
    first would use a wrong bias correction. Set each parameter's own `step` from the
    saved param_groups, which hold the true count."""
    steps = {g["step"] for g in loaded_state["optimizer"]["param_groups"] if "step" in g}
    if len(steps) != 1:
        raise ValueError(f"checkpoint optimizer state has inconsistent Adam steps {steps}")
    step = float(steps.pop())
    for inner in inner_torch_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def _write_results_in_process():
    """A synchronous save keeps the torch_dist writer's results in this process.

    megatron-core's writer returns them through a queue of a `multiprocessing.Manager` it
    starts with the spawn method (made for asynchronous saves, whose writer is another
    process): a fresh interpreter that imports torch to unpickle the first result, 2.6 s of
    every launch that saves (measured, 2-core AMD EPYC). A synchronous save writes from this
    process, so a plain queue serves. Reads megatron's module global (AttributeError, so every
    checkpoint test fails, if it is renamed)."""
    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def save_checkpoint(
    path: Path, model: List, meta: CheckpointMeta, config_yaml: str, tokenizer=None,
    optimizer=None, scheduler=None, distributed_optimizer: bool = False, sharded_strategy=None,
    async_save: bool = False,
):
    """Collective. Writes the checkpoint directory `path` atomically: into a `.tmp-` sibling
    first, renamed into place once complete. Without an optimizer it holds the weights only
    (a conversion from Hugging Face, whose `sharded_strategy` produces them on demand); the
    tokenizer files go beside the weights. Returns `path`.

    With `async_save` (megatron-core's asynchronous torch_dist save) it returns at once an
    `AsyncRequest` instead: the tensors are staged to host memory (a forked writer's copy of
    this process on a CPU), a writer process writes them, and the request's finalize functions,
    run on every rank by `AsyncCallsQueue.maybe_finalize_async_calls`, write the metadata and
    commit the directory exactly as a synchronous save does. Until then the checkpoint is only
    a `.tmp-` directory, which nothing loads."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        tmp.mkdir(parents=True)
    _barrier()
    metadata = sharded_metadata(distributed_optimizer)
    state = model_sharded_state_dict(model, metadata)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                          metadata=metadata)
        state["scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
    meta.optimizer_sharding = metadata.get("distrib_optim_sharding_type")

    def commit() -> None:
        _barrier()
        if torch.distributed.get_rank() == 0:
            meta.saved_at = time.time()
            _write_durably(tmp / CONFIG_FILE, config_yaml)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            # megatron fsyncs the shards and .metadata, not its common.pt / metadata.json
            for written in (*_COMMON_FILES, TOKENIZER_DIR):
                _fsync_tree(tmp / written)
            _write_durably(tmp / META_FILE, json.dumps(meta.__dict__, indent=2))
            _fsync_dir(tmp)
            _commit(tmp, path)
        _barrier()

    if async_save:
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy,
                                          async_sharded_save=True)
        request.add_finalize_fn(commit)
        return request
    with _write_results_in_process():
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy)
    commit()
    return path


_COMMON_FILES = ("common.pt", "metadata.json")


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """A directory's entries (a rename, a new file) reach the disk only with its own fsync."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory under `path` (absent: nothing)."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    elif path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
        _fsync_dir(path)


def _commit(tmp: Path, final: Path) -> None:
    """Rename into place; an older checkpoint of the same step is replaced only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)  # the rename itself is durable only once its directory is
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _best_first(found) -> list:
    """(step, path, meta) ranked for monitor=val_loss: finite losses, lowest first; then
    checkpoints without their own validation loss, newest first; a NaN (or infinite) loss is
    never "best": after all of them, newest first."""
    def key(f):
        loss = f[2].val_loss
        if loss is None:
            return (1, 0.0, -f[0])
        if not math.isfinite(loss):
            return (2, 0.0, -f[0])
        return (0, loss, -f[0])
    return sorted(found, key=key)


def prune_checkpoints(root: Path, keep: int, monitor: str) -> List[Path]:
    """Keep the newest checkpoint and the best `keep` by monitor; returns what was removed."""
    found = [(step, path, read_meta(path)) for step, path in list_checkpoints(root)]
    if len(found) <= keep:
        return []
    ranked = _best_first(found) if monitor == "val_loss" else sorted(found, key=lambda f: -f[0])
    kept = {path for _, path, _ in ranked[:keep]} | {found[-1][1]}
    removed = [path for _, path, _ in found if path not in kept]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


EXTRA_STATE = "_extra_state"


class CheckpointMismatch(RuntimeError):
    """The checkpoint lacks weights the model needs (not just Transformer Engine extra state)."""


def _is_extra_state(key: str) -> bool:
    return key.split("/")[0].endswith(EXTRA_STATE)


def _absent_weights(path: Path, keys, optional=()) -> None:
    absent = sorted(k for k in keys if not _is_extra_state(k)
                    and not any(f".{name}" in k for name in optional))
    if absent:
        raise CheckpointMismatch(
            f"{path} lacks {len(absent)} tensor(s) this model needs, e.g. {absent[:4]}: it was "
            "written for another architecture (compare its config.yaml with this run's)")


def _load_module(chunk, state: dict, path: Path, optional=()) -> None:
    """load_state_dict that lets Transformer Engine extra state (FP8 scaling metadata), and
    the `optional` entries, stay freshly initialised when the checkpoint has none (written by
    the local spec: CPU runs, HF imports; a base model under new adapters), and refuses any
    other missing entry."""
    result = unwrap_model(chunk).load_state_dict(state, strict=False)
    _absent_weights(path, result.missing_keys, optional)
    unexpected = [k for k in result.unexpected_keys if not _is_extra_state(k)]
    if unexpected:
        raise CheckpointMismatch(f"{path} holds tensors this model has no place for: "
                                 f"{sorted(unexpected)[:4]}")


def checkpoint_has_adapters(path: Path) -> bool:
    """Written by a LoRA run (it holds lora_a / lora_b)."""
    from danube.paths import checkpoint_tensor_shapes

    return any(".lora_" in key for key in checkpoint_tensor_shapes(path))


def lora_scale(path: Path) -> float:
    """alpha / adapter_dim of the LoRA run that wrote checkpoint `path`."""
    from danube.model.lora import lora_scale_of_config as scale_of_config
    from danube.paths import CONFIG_FILE

    return scale_of_config(path / CONFIG_FILE)


def _adapters_present(path: Path, state: dict) -> None:
    """A LoRA model resuming needs adapters in the checkpoint (megatron would fail deep inside
    its SwiGLU factory merge instead of naming the problem)."""
    from danube.paths import checkpoint_tensor_shapes

    wanted = [n for chunk in state.values() for n in chunk if ".lora_" in n]
    if wanted and not any(".lora_" in key for key in checkpoint_tensor_shapes(path)):
        raise CheckpointMismatch(
            f"{path} has no LoRA adapters (lora_a/lora_b) but this model has {len(wanted)}: "
            "it was not written by a LoRA run. Start from it with model.restore_from_path in a "
            "new experiment (adapters start fresh) instead of resuming")


def load_checkpoint(
    path: Path, model: List, optimizer=None, scheduler=None, distributed_optimizer: bool = False,
    optional=(),
) -> CheckpointMeta:
    """Collective. Loads the model; with optimizer/scheduler also their states and the RNG.
    Entries named in `optional` (e.g. "lora_": adapters new to a run starting from a base
    model) are not read even where the checkpoint has them, and keep their initial values."""
    meta = read_meta(path)
    full = optimizer is not None
    metadata = sharded_metadata(distributed_optimizer and full)
    state = model_sharded_state_dict(model, metadata)
    if optional:
        state = {key: {name: value for name, value in chunk.items()
                       if not any(f".{o}" in name for o in optional)}
                 for key, chunk in state.items()}
    else:
        _adapters_present(path, state)
    # RNG states are per (PP, TP) rank: they only carry over to the same layout.
    same_layout = meta.layout.get("tp") == parallel_state.get_tensor_model_parallel_world_size() \
        and meta.layout.get("pp") == parallel_state.get_pipeline_model_parallel_world_size()
    if full:
        if distributed_optimizer and not HAVE_APEX_OR_TE:
            _init_adam_states(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
        if same_layout:
            state["rng_state"] = _rng_state()
    # Keys the model asks for that the checkpoint lacks come back as "unexpected" and are not
    # read: TE's `_extra_state` when a TE-spec model loads a local-spec checkpoint. Keys only
    # the checkpoint has (TE extra state, into a local-spec model) are never asked for.
    loaded, _, not_in_checkpoint = dist_checkpointing.load(
        state, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    _absent_weights(path, not_in_checkpoint, optional)
    for key, chunk in zip(_state_keys(model), model):
        _load_module(chunk, loaded[key], path, optional)
    if full:
        # The distributed optimizer copies into fp32 main params that are views of leaves.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        if distributed_optimizer and not HAVE_APEX_OR_TE:
            _restore_adam_steps(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _restore_rng_state(loaded["rng_state"])
    return meta
