"""Wrap the model for training and build megatron-core's optimizer and LR schedule."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from danube.config.schema import OptimConfig

_DECAY_STYLES = {"CosineAnnealing": "cosine", "LinearAnnealing": "linear", "Constant": "constant"}


def uses_distributed_optimizer(optim: OptimConfig) -> bool:
    return optim.name == "distributed_fused_adam"


def ddp_config(optim: OptimConfig, data_parallel_size: int) -> DistributedDataParallelConfig:
    """megatron DDP's settings: the overlaps apply with more than one data-parallel rank
    (with one there is nothing to reduce or gather)."""
    distributed = uses_distributed_optimizer(optim)
    overlap = data_parallel_size > 1
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_sync_dtype == "fp32",
        overlap_grad_reduce=overlap and optim.overlap_grad_sync,
        overlap_param_gather=overlap and distributed and optim.overlap_param_sync,
        use_distributed_optimizer=distributed,
    )


def _per_chunk(functions: List):
    return functions[0] if len(functions) == 1 else functions


def wrap_for_training(
    chunks: List, config: TransformerConfig, optim: OptimConfig, data_parallel_size: int
) -> List[DistributedDataParallel]:
    """Float16Module (bf16) then megatron DDP, in that order: wrapping DDP first breaks
    checkpoint saving ("Param id N does not match any model sharded param"). With the
    gradient reduce overlapped, megatron's schedules hold it back over all but the last
    micro-batch (`no_sync_func`) and launch it per chunk (`grad_sync_func`), as Megatron-LM's
    training.py wires them; `finalize_model_grads` waits for it."""
    settings = ddp_config(optim, data_parallel_size)
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if config.bf16 else chunk
        wrapped.append(
            DistributedDataParallel(
                config=config, ddp_config=settings, module=module,
                # Megatron-LM: only the first chunk's buckets may be sized by the DDP default.
                disable_bucketing=index > 0,
            )
        )
    config.finalize_model_grads_func = finalize_model_grads
    if settings.overlap_grad_reduce:
        config.no_sync_func = _per_chunk([chunk.no_sync for chunk in wrapped])
        config.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in wrapped])
    return wrapped


@contextmanager
def params_synced(model: List) -> Iterator[None]:
    """Weights complete on every rank inside, and left alone by the forward pass: with the
    weight all-gather overlapped (distributed optimizer), the step's gather is only waited for
    in the next forward's pre-hooks, so a checkpoint (or a weight swap) taken right after an
    update would see other ranks' shards stale. Forces the gather, hooks off inside."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def build_optimizer(
    optim: OptimConfig, clip_grad: float, config: TransformerConfig, model: List,
    skip_non_finite: bool = False,
) -> MegatronOptimizer:
    """AdamW (decoupled decay, none on biases and norms) with fp32 main weights under bf16.
    `skip_non_finite` (bf16): a constant grad scaler of 1 (the loss times 1, the gradients
    unscaled by 1: the same bits) gives megatron's mixed-precision optimizer its found-inf
    check, all-reduced over the model-parallel group: a step with a non-finite gradient
    returns (False, None, None) and updates nothing (trainer.nan_policy=skip)."""
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.sched.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=uses_distributed_optimizer(optim),
        loss_scale=1.0 if skip_non_finite and config.bf16 else None,
    )
    optimizer = get_megatron_optimizer(optimizer_config, model)
    config.grad_scale_func = optimizer.scale_loss
    if _on_cuda(model) and not HAVE_APEX_OR_TE:
        use_torch_fused_paths(optimizer)
    return optimizer


def _on_cuda(model: List) -> bool:
    return any(p.is_cuda for chunk in model for p in chunk.parameters())


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's multi_tensor_l2norm from torch's foreach kernels: megatron's own fallback
    (`local_multi_tensor_l2_norm`) builds a host tensor of per-parameter norms, one device
    sync per parameter tensor at every clipped step."""
    import torch

    tensors = [t for tensors in tensor_lists for t in tensors]
    norms = torch._foreach_norm(tensors) if tensors else [torch.zeros((), device="cuda")]
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """apex's multi_tensor_scale (dst = src * scale) from torch's foreach kernels."""
    import torch

    src, dst = tensor_lists[0], tensor_lists[1]
    if src:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_torch_fused_paths(optimizer) -> None:
    """On a GPU without apex or Transformer Engine megatron-core falls back to torch's AdamW
    (unfused: a kernel per op per parameter) and to Python loops for the gradient norm and
    scaling. torch has fused versions of all three: AdamW's `fused` implementation (one
    kernel over every parameter; it follows the same update rule, megatron keeps calling
    `step()`) and foreach norms and scales. Set here, before the first step."""
    from megatron.core.optimizer import clip_grads

    for inner in inner_torch_optimizers(optimizer):
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        inner.defaults["fused"], inner.defaults["foreach"] = True, False
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = _foreach_scale


def inner_torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


def build_scheduler(
    optim: OptimConfig, max_steps: int, optimizer: MegatronOptimizer,
    tokens_after: Optional[Callable[[int], int]] = None,
) -> OptimizerParamScheduler:
    """NeMo schedule names on megatron's scheduler, stepped once per optimizer step:
    linear warmup to lr, decay to min_lr at (horizon - constant_steps), then flat.
    `train_step` advances it *before* each update, so update k (from 1) uses
    lr * k / warmup_steps as NeMo's warmup does (megatron-LM spends its first update at lr 0).
    On resume the config wins (NeMo's behaviour; megatron's default keeps the checkpoint's
    lr/min_lr/warmup/decay while config.yaml would record the new ones): only the step count
    comes from the checkpoint, and the launch lists what changed (loop.restore).

    With `tokens_after` (a ramp whose tokens per step change) the schedule counts tokens:
    each step advances it by the step's tokens, and the step-denominated keys are placed at
    the tokens trained after that many steps (warmup ends after `warmup_steps` steps' tokens,
    the decay after `max_steps - constant_steps` steps' tokens), so the LR follows the tokens
    seen, continuously across stages."""
    sched = optim.sched
    horizon = sched.max_steps or max_steps
    at = tokens_after or (lambda steps: steps)
    warmup = at(sched.warmup_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=sched.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(at(horizon - sched.constant_steps), warmup + 1),
        lr_decay_style=_DECAY_STYLES[sched.name],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=at(horizon),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
