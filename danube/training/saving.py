"""Checkpoint saves as the loop makes them: blocking or in the background, committed at a step
boundary, a failed background write survived, leftovers of killed saves removed.

Every decision here is taken from what every rank knows alike (the loop's committed step, the
all-reduced outcome of a background write), never from a rank's own view of the filesystem:
on a cluster one node's view of a shared directory can lag (attribute caches), and a rank that
entered a collective save alone would hang the job until the NCCL timeout.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from megatron.core import parallel_state
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from danube.paths import (
    TMP_PREFIX,
    CheckpointMeta,
    checkpoint_dir_name,
    checkpoint_root,
    latest_checkpoint,
)
from danube.training import checkpoint as ckpt
from danube.training.engine import params_synced, uses_distributed_optimizer
from danube.training.signals import UNMEASURED_SAVE_BYTES_PER_S, children_ignore_stop_signals

# Fault injection for the tests of a background write that dies (an OOM kill): comma-separated
# steps whose asynchronous writer process is SIGKILLed right after it starts.
INJECT_WRITER_KILL_ENV = "DANUBE_INJECT_WRITER_KILL_AT_STEPS"


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (the message names the directory and the cause)."""


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def state_bytes(trainer) -> int:
    """About what a checkpoint of this rank's state weighs: the parameters in their dtype plus
    Adam's fp32 main copy and two moments (12 bytes a parameter)."""
    total = 0
    for chunk in trainer.model:
        for p in chunk.parameters():
            if p.requires_grad:
                total += p.numel() * (p.element_size() + 12)
            else:
                total += p.numel() * p.element_size()
    return total


def unmeasured_save_seconds(trainer) -> float:
    return state_bytes(trainer) / UNMEASURED_SAVE_BYTES_PER_S


def _causes(error: BaseException) -> list:
    """The error, its causes and, for torch's CheckpointException, each rank's failure."""
    seen, todo, found = set(), [error], []
    while todo:
        e = todo.pop()
        if isinstance(e, tuple):  # torch.distributed.checkpoint's (exception, traceback)
            todo += [x for x in e if isinstance(x, BaseException)]
            continue
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return found


def _is_disk_full(error: BaseException, root: Path, needed: int) -> bool:
    """ENOSPC anywhere in the chain, or (torch's zip writer reports a short write as
    "unexpected pos") less space free than a checkpoint needs."""
    for e in _causes(error):
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
                "No space left on device" in str(e):
            return True
    return shutil.disk_usage(root).free < needed


def _root_cause(error: BaseException) -> str:
    causes = _causes(error)
    deepest = causes[-1] if causes else error
    first = str(deepest).strip().splitlines()
    return f"{type(deepest).__name__}: {first[0] if first else ''}"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_write_failure(trainer, path: Path, error: BaseException) -> str:
    """What went wrong with the save of `path`, and for a full disk: where, how much is
    needed (the newest checkpoint's size, or the state's estimate) and how much is free."""
    root = path.parent
    newest = latest_checkpoint(root)
    world = torch.distributed.get_world_size()
    needed = _dir_bytes(newest) if newest is not None else state_bytes(trainer) * world
    if not _is_disk_full(error, root, needed):
        return _root_cause(error)
    free = shutil.disk_usage(root).free
    keep = trainer.cfg.exp_manager.checkpoint_callback_params.save_top_k
    return (f"no space left on the device of {root}: a checkpoint needs about "
            f"{needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are free (save_top_k={keep} keeps "
            f"up to {keep + 1} checkpoints while the next is written). Free space there, lower "
            "exp_manager.checkpoint_callback_params.save_top_k, or point exp_manager.exp_dir "
            "at a larger filesystem")


def _meta(trainer) -> CheckpointMeta:
    m = trainer.cfg.model
    return CheckpointMeta(
        step=trainer.step, consumed_samples=trainer.consumed_samples,
        # its own step's validation loss or none: an older one would misrank it (save_top_k)
        val_loss=trainer.last_val_loss if trainer.last_val_step == trainer.step else None,
        layout={"tp": m.tensor_model_parallel_size, "pp": m.pipeline_model_parallel_size,
                "vp": m.virtual_pipeline_model_parallel_size,
                "dp": parallel_state.get_data_parallel_world_size()},
        data_plan=trainer.recipe.data_plan if trainer.recipe else None,
    )


def save(trainer, blocking: bool = False) -> None:
    """Checkpoint this step (collective). With `async_save` (and not `blocking`) the files are
    written in the background while training goes on; the checkpoint is committed (and older
    ones pruned) at a later step boundary, by `finish_saves`. A blocking save that fails
    raises CheckpointWriteFailed (after the in-flight save, if any, is settled)."""
    cfg, m = trainer.cfg, trainer.cfg.model
    path = checkpoint_root(cfg.exp_manager) / checkpoint_dir_name(trainer.step)
    in_background = cfg.exp_manager.checkpoint_callback_params.async_save and not blocking
    finish_saves(trainer)  # one save in flight at a time
    step, start = trainer.step, time.perf_counter()
    with trainer.stops.during_save() if trainer.stops else nullcontext():
        # params_synced: an overlapped weight all-gather completes before the weights are saved
        with children_ignore_stop_signals(), params_synced(trainer.model):
            try:
                saved = ckpt.save_checkpoint(
                    path, trainer.model, _meta(trainer), trainer.config_yaml,
                    tokenizer=trainer.tokenizer, optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler,
                    distributed_optimizer=uses_distributed_optimizer(m.optim),
                    async_save=in_background)
            except (Exception, CheckpointException) as error:  # said with the directory
                _remove_failed(path)
                raise CheckpointWriteFailed(
                    f"step {step}: saving {path} failed: "
                    f"{describe_write_failure(trainer, path, error)}") from error
            if in_background:
                from megatron.core.dist_checkpointing.strategies.async_utils import (
                    AsyncCallsQueue,
                )

                saved.add_finalize_fn(lambda: _committed(trainer, step, path, start,
                                                         "written in the background"))
                trainer.saves = trainer.saves or AsyncCallsQueue()
                trainer.saves.schedule_async_request(saved)  # stages tensors, forks the writer
                trainer.pending_save = (step, path)
                _maybe_kill_writer(trainer, step)
                trainer.log.info(f"step {step}: writing checkpoint {path.name} in the "
                                 f"background (training paused "
                                 f"{time.perf_counter() - start:.2f} s)")
                return
        _committed(trainer, step, path, start,
                   f"training paused {time.perf_counter() - start:.2f} s")


def _maybe_kill_writer(trainer, step: int) -> None:
    steps = {int(s) for s in os.environ.get(INJECT_WRITER_KILL_ENV, "").split(",") if s.strip()}
    if step in steps:
        process = trainer.saves.async_calls[-1].async_caller.process
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)


def _committed(trainer, step: int, path: Path, start: float, how: str) -> None:
    """After a checkpoint's commit, on every rank: the loop's resume point moves to it."""
    torch.distributed.barrier()
    trainer.committed_step = step
    trainer.pending_save = None
    trainer.costs.note("save", time.perf_counter() - start)
    if _rank0():  # after the barrier: the other ranks train on meanwhile
        params = trainer.cfg.exp_manager.checkpoint_callback_params
        ckpt.prune_checkpoints(checkpoint_root(trainer.cfg.exp_manager), params.save_top_k,
                               params.monitor)
    trainer.log.info(f"saved checkpoint {path} ({how})")


def finish_saves(trainer, blocking: bool = True) -> None:
    """Commit the asynchronous saves whose writers are done on every rank (collective: one
    small all-reduce while a save is in flight, nothing otherwise); `blocking` waits for
    them. A write that failed on any rank (its writer killed, a full disk) fails on every rank
    alike: it is logged by step, its `.tmp-` directory removed, and the last committed
    checkpoint stays the resume point."""
    if trainer.saves is None or not trainer.saves.get_num_unfinalized_calls():
        return
    try:
        trainer.saves.maybe_finalize_async_calls(blocking=blocking)
    except CheckpointException as error:
        step, path = trainer.pending_save  # set by `save` for the one write in flight
        trainer.pending_save = None
        trainer.saves.async_calls.clear()
        keep = "none" if trainer.committed_step is None else \
            checkpoint_dir_name(trainer.committed_step)
        _remove_failed(path)
        trainer.log.info(
            f"warning: step {step}: the background write of checkpoint {path} failed "
            f"({describe_write_failure(trainer, path, error)}); the resume point stays {keep}")


def _remove_failed(path: Path) -> None:
    """The `.tmp-` directory of a failed save (collective: rank 0 removes, all wait)."""
    torch.distributed.barrier()
    if _rank0():
        shutil.rmtree(path.with_name(f"{TMP_PREFIX}{path.name}"), ignore_errors=True)
    torch.distributed.barrier()


def remove_orphaned_saves(trainer) -> None:
    """Rank 0, once the resume point is agreed: `.tmp-step_*` directories left by killed saves
    (or a changed save interval) are never loaded; they are removed, with how much came back."""
    if not _rank0():
        return
    root = checkpoint_root(trainer.cfg.exp_manager)
    if not root.is_dir():
        return
    orphans = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    if not orphans:
        return
    freed = sum(_dir_bytes(p) for p in orphans)
    for p in orphans:
        shutil.rmtree(p, ignore_errors=True)
    trainer.log.info(f"removed {len(orphans)} unfinished checkpoint save(s) "
                     f"({', '.join(sorted(p.name for p in orphans))}): "
                     f"{freed / 1e6:,.1f} MB freed")
