"""Wrap the model for training and build megatron-core's optimizer and LR schedule."""

from __future__ import annotations

from typing import List

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from danube.config.schema import OptimConfig

_DECAY_STYLES = {"CosineAnnealing": "cosine", "LinearAnnealing": "linear", "Constant": "constant"}


def uses_distributed_optimizer(optim: OptimConfig) -> bool:
    return optim.name == "distributed_fused_adam"


def wrap_for_training(
    chunks: List, config: TransformerConfig, optim: OptimConfig
) -> List[DistributedDataParallel]:
    """Float16Module (bf16) then megatron DDP, in that order: wrapping DDP first breaks
    checkpoint saving ("Param id N does not match any model sharded param")."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=uses_distributed_optimizer(optim),
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if config.bf16 else chunk
        wrapped.append(
            DistributedDataParallel(
                config=config, ddp_config=ddp_config, module=module,
                # Megatron-LM: only the first chunk's buckets may be sized by the DDP default.
                disable_bucketing=index > 0,
            )
        )
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(
    optim: OptimConfig, clip_grad: float, config: TransformerConfig, model: List
) -> MegatronOptimizer:
    """AdamW (decoupled decay, none on biases and norms) with fp32 main weights under bf16."""
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
    )
    optimizer = get_megatron_optimizer(optimizer_config, model)
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(
    optim: OptimConfig, max_steps: int, optimizer: MegatronOptimizer
) -> OptimizerParamScheduler:
    """NeMo schedule names on megatron's scheduler, stepped once per optimizer step:
    linear warmup to lr, decay to min_lr at (horizon - constant_steps), then flat.
    `train_step` advances it *before* each update, so update k (from 1) uses
    lr * k / warmup_steps as NeMo's warmup does (megatron-LM spends its first update at lr 0).
    On resume the config wins (NeMo's behaviour; megatron's default keeps the checkpoint's
    lr/min_lr/warmup/decay while config.yaml would record the new ones): only the step count
    comes from the checkpoint, and the launch lists what changed (loop.restore)."""
    sched = optim.sched
    horizon = sched.max_steps or max_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=sched.min_lr,
        lr_warmup_steps=sched.warmup_steps,
        lr_decay_steps=max(horizon - sched.constant_steps, sched.warmup_steps + 1),
        lr_decay_style=_DECAY_STYLES[sched.name],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=horizon,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
