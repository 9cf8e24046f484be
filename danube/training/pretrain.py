"""Pretraining: build everything from a validated config, then train, validate, checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

import torch
from megatron.core import parallel_state

from danube.config.compose import to_yaml
from danube.config.derived import normalized_precision, num_microbatches, world_size
from danube.config.schema import PretrainConfig
from danube.data.embedded import embedded_tokenizer, ensure_embedded_corpus
from danube.data.gpt import build_gpt_datasets, build_loader, gpt_dataset_config
from danube.data.tokenizer import Tokenizer, load_tokenizer
from danube.model.builder import build_model_chunks, transformer_config, uses_transformer_engine
from danube.paths import (
    CheckpointMeta,
    checkpoint_dir_name,
    checkpoint_root,
    exp_dir,
    is_complete,
    latest_checkpoint,
)
from danube.runtime import PrecisionChoice, resolve_precision, use_cuda
from danube.training import checkpoint as ckpt
from danube.training.distributed import init_distributed, shutdown
from danube.training.engine import (
    build_optimizer,
    build_scheduler,
    uses_distributed_optimizer,
    wrap_for_training,
)
from danube.training.metrics import MetricsLogger
from danube.training.step import StepShape, evaluate, train_step


@dataclass
class Trainer:
    """What the loop needs, built once."""

    cfg: PretrainConfig
    model: List
    optimizer: object
    scheduler: object
    datasets: list
    shape: StepShape
    device: torch.device
    log: MetricsLogger
    tokenizer: Tokenizer
    config_yaml: str = ""
    step: int = 0
    consumed_samples: int = 0
    last_val_loss: Optional[float] = None


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _barrier() -> None:
    torch.distributed.barrier()


def with_machine_precision(cfg: PretrainConfig):
    """(cfg with trainer.precision resolved for this machine, the choice): `auto` becomes
    bf16-mixed or 32 before anything is built, so the saved config says what ran."""
    choice = resolve_precision(cfg.trainer.precision, use_cuda(cfg.trainer.accelerator))
    return replace(cfg, trainer=replace(cfg.trainer, precision=choice.precision)), choice


def config_yaml(cfg: PretrainConfig, choice: PrecisionChoice) -> str:
    """The resolved config as saved (run directory and checkpoints), with why its precision."""
    return f"# trainer.precision={choice.precision}: {choice.reason}\n" + to_yaml(cfg)


def build_tokenizer(cfg: PretrainConfig):
    """The tokenizer, and the embedded corpus directory when the config uses it (rank 0
    builds it on first use; the others wait and reuse it)."""
    tok = cfg.model.tokenizer
    if tok.library != "embedded":
        return load_tokenizer(tok.model), None
    cache = cfg.model.data.embedded_cache_dir
    if _is_rank0():
        ensure_embedded_corpus(tok.vocab_size, cache and Path(cache))
    _barrier()
    corpus_dir = ensure_embedded_corpus(tok.vocab_size, cache and Path(cache))
    return embedded_tokenizer(corpus_dir), corpus_dir


def build_trainer(cfg: PretrainConfig, tokenizer: Tokenizer, corpus_dir) -> Trainer:
    m = cfg.model
    device = torch.device(f"cuda:{torch.cuda.current_device()}"
                          if use_cuda(cfg.trainer.accelerator) else "cpu")
    use_te = uses_transformer_engine(m)
    config = transformer_config(m, normalized_precision(cfg.trainer.precision), use_te)
    chunks = build_model_chunks(m, config, tokenizer.vocab_size, use_te)
    model = wrap_for_training(chunks, config, m.optim)
    optimizer = build_optimizer(m.optim, cfg.trainer.gradient_clip_val, config, model)
    scheduler = build_scheduler(m.optim, cfg.trainer.max_steps, optimizer)
    gbs, t = m.global_batch_size, cfg.trainer
    cache_dir = Path(m.data.index_mapping_dir or exp_dir(cfg.exp_manager) / "index_cache")
    datasets = build_gpt_datasets(
        gpt_dataset_config(m.data, tokenizer, m.seed, cache_dir, corpus_dir),
        [t.max_steps * gbs, t.limit_val_batches * gbs, t.limit_test_batches * gbs],
    )
    shape = StepShape(num_microbatches(m, world_size(cfg)), m.micro_batch_size,
                      m.encoder_seq_length)
    log = MetricsLogger(exp_dir(cfg.exp_manager), cfg.exp_manager.create_tensorboard_logger,
                        t.max_steps, enabled=_is_rank0())
    return Trainer(cfg, model, optimizer, scheduler, datasets, shape, device, log, tokenizer)


def agreed_latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint as rank 0 sees it, on every rank: nodes listing a shared
    filesystem at slightly different moments must still load the same step. Collective."""
    choice = [None]
    if _is_rank0():
        latest = latest_checkpoint(root)
        choice = [None if latest is None else str(latest)]
    torch.distributed.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def restore(trainer: Trainer) -> None:
    """Resume from this experiment's newest checkpoint, else load restore_from_path weights."""
    cfg = trainer.cfg
    dist_opt = uses_distributed_optimizer(cfg.model.optim)
    latest = agreed_latest_checkpoint(checkpoint_root(cfg.exp_manager))
    if cfg.exp_manager.resume_if_exists and latest is not None:
        meta = ckpt.load_checkpoint(latest, trainer.model, trainer.optimizer, trainer.scheduler,
                                    dist_opt)
        trainer.step, trainer.consumed_samples = meta.step, meta.consumed_samples
        trainer.last_val_loss = meta.val_loss
        trainer.log.info(f"resumed from {latest} (step {meta.step})")
    elif cfg.model.restore_from_path:
        ckpt.load_checkpoint(Path(cfg.model.restore_from_path), trainer.model)
        # The loaded weights are bf16/fp32 model params; refresh the fp32 main copies.
        trainer.optimizer.reload_model_params()
        trainer.log.info(f"initialised weights from {cfg.model.restore_from_path}")


def data_iterators(trainer: Trainer, split: int, consumed: int) -> list:
    """One iterator per model chunk (the interleaved schedule pulls from each)."""
    dataset = trainer.datasets[split]
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return [
        iter(build_loader(dataset, consumed, trainer.shape.micro_batch_size, dp_rank, dp_size,
                          trainer.cfg.model.data.num_workers))
        for _ in trainer.model
    ]


def _validate(trainer: Trainer, split: int, batches: int, name: str) -> Optional[float]:
    if batches == 0 or trainer.datasets[split] is None:
        return None
    loss = evaluate(trainer.model, data_iterators(trainer, split, 0), batches, trainer.shape,
                    trainer.device)
    trainer.log.log_validation(trainer.step, loss, name)
    return loss


def _save(trainer: Trainer) -> None:
    cfg, m = trainer.cfg, trainer.cfg.model
    root = checkpoint_root(cfg.exp_manager)
    meta = CheckpointMeta(
        step=trainer.step, consumed_samples=trainer.consumed_samples,
        val_loss=trainer.last_val_loss,
        layout={"tp": m.tensor_model_parallel_size, "pp": m.pipeline_model_parallel_size,
                "vp": m.virtual_pipeline_model_parallel_size,
                "dp": parallel_state.get_data_parallel_world_size()},
    )
    path = ckpt.save_checkpoint(
        root / checkpoint_dir_name(trainer.step), trainer.model, meta, trainer.config_yaml,
        tokenizer=trainer.tokenizer, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
        distributed_optimizer=uses_distributed_optimizer(m.optim))
    if _is_rank0():
        params = cfg.exp_manager.checkpoint_callback_params
        ckpt.prune_checkpoints(root, params.save_top_k, params.monitor)
    _barrier()
    trainer.log.info(f"saved checkpoint {path}")


def train_loop(trainer: Trainer) -> None:
    cfg, t = trainer.cfg, trainer.cfg.trainer
    every = cfg.exp_manager.checkpoint_callback_params.every_n_train_steps
    tokens_per_step = cfg.model.global_batch_size * cfg.model.encoder_seq_length
    if trainer.step < t.max_steps:
        iterators = data_iterators(trainer, 0, trainer.consumed_samples)
    trainer.log.start(trainer.step)
    window_time, window_steps = 0.0, 0  # training time only: not validation, not saving
    while trainer.step < t.max_steps:
        step_start = time.perf_counter()
        loss, lr, grad_norm = train_step(trainer.model, trainer.optimizer, trainer.scheduler,
                                         iterators, trainer.shape, trainer.device)
        trainer.step += 1
        trainer.consumed_samples += cfg.model.global_batch_size
        step_time = time.perf_counter() - step_start
        window_time, window_steps = window_time + step_time, window_steps + 1
        last = trainer.step == t.max_steps
        if trainer.step % t.log_every_n_steps == 0 or last:
            trainer.log.log_train(
                trainer.step, loss, lr, None if grad_norm is None else float(grad_norm),
                tokens_per_step * window_steps / window_time, step_time,
                trainer.consumed_samples)
            window_time, window_steps = 0.0, 0
        if trainer.step % t.val_check_interval == 0 or last:
            trainer.last_val_loss = _validate(trainer, 1, t.limit_val_batches, "val")
        if every and trainer.step % every == 0:
            _save(trainer)
    # The last step, unless already saved (also step 0 with max_steps=0: initial weights).
    if cfg.exp_manager.checkpoint_callback_params.save_last and not is_complete(
            checkpoint_root(cfg.exp_manager) / checkpoint_dir_name(trainer.step)):
        _save(trainer)


def run_pretraining(cfg: PretrainConfig) -> None:
    """The whole job: set up, restore, train, test. Collective across the launch."""
    cfg, precision = with_machine_precision(cfg)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    try:
        tokenizer, corpus_dir = build_tokenizer(cfg)
        trainer = build_trainer(cfg, tokenizer, corpus_dir)
        trainer.config_yaml = config_yaml(cfg, precision)
        if _is_rank0():
            exp_dir(cfg.exp_manager).mkdir(parents=True, exist_ok=True)
            (exp_dir(cfg.exp_manager) / "config.yaml").write_text(trainer.config_yaml)
        if precision.warning:
            trainer.log.info(f"warning: {precision.warning}")
        restore(trainer)
        m = cfg.model
        params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
        dp = parallel_state.get_data_parallel_world_size()
        trainer.log.info(
            f"training {cfg.name}: {params / 1e6:.2f}M parameters on rank 0, "
            f"{'Transformer Engine' if uses_transformer_engine(m) else 'local'} layers, "
            f"precision {cfg.trainer.precision} ({precision.reason}), "
            f"TP {m.tensor_model_parallel_size} "
            f"PP {m.pipeline_model_parallel_size} DP {dp}"
            f"; step {trainer.step} -> {cfg.trainer.max_steps}, "
            f"{trainer.shape.num_microbatches} micro-batch(es) of "
            f"{trainer.shape.micro_batch_size} x {trainer.shape.seq_length} tokens")
        train_loop(trainer)
        _validate(trainer, 2, cfg.trainer.limit_test_batches, "test")
        trainer.log.close()
    finally:
        shutdown()
