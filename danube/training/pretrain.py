"""Pretraining: the pretraining recipe (megatron-core GPTDataset blends, Megatron's sample
order) for the one loop in `danube.training.loop`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional

from megatron.core import parallel_state

from danube.config.derived import num_microbatches, world_size
from danube.config.schema import PretrainConfig
from danube.data.embedded import embedded_tokenizer, ensure_embedded_corpus
from danube.data.gpt import build_gpt_datasets, build_loader, data_plan, gpt_dataset_config
from danube.paths import exp_dir
from danube.runtime import use_cuda
from danube.training.distributed import init_distributed, shutdown
from danube.training.loop import (
    Recipe,
    StepData,
    barrier,
    build_trainer,
    is_rank0,
    run,
    with_machine_precision,
)

__all__ = ["build_tokenizer", "pretraining_recipe", "run_pretraining", "with_machine_precision"]


def build_tokenizer(cfg: PretrainConfig):
    """The tokenizer, and the embedded corpus directory when the config uses it (rank 0
    builds it on first use; the others wait and reuse it)."""
    from danube.data.tokenizer import load_tokenizer

    tok = cfg.model.tokenizer
    if tok.library != "embedded":
        return load_tokenizer(tok.model), None
    cache = cfg.model.data.embedded_cache_dir
    if is_rank0():
        ensure_embedded_corpus(tok.vocab_size, cache and Path(cache))
    barrier()
    corpus_dir = ensure_embedded_corpus(tok.vocab_size, cache and Path(cache))
    return embedded_tokenizer(corpus_dir), corpus_dir


def horizon_steps(cfg: PretrainConfig) -> int:
    """The steps the training index is built for: the schedule's horizon
    (model.optim.sched.max_steps, default trainer.max_steps), or trainer.max_steps if larger.
    A run stopped early by a lower trainer.max_steps with the schedule's horizon kept reads
    its data in the same order as the full run (a source read for several epochs is shuffled
    over all of them, so the index size decides its order)."""
    return max(cfg.trainer.max_steps, cfg.model.optim.sched.max_steps or 0)


def pretraining_recipe(cfg: PretrainConfig, tokenizer, corpus_dir) -> Recipe:
    """GPTDataset splits read in Megatron's order: global batch k is samples k*G..(k+1)*G-1 of
    the split, this rank taking its micro-batch slices (collective: builds the index cache)."""
    m, t = cfg.model, cfg.trainer
    gbs = m.global_batch_size
    cache_dir = Path(m.data.index_mapping_dir or exp_dir(cfg.exp_manager) / "index_cache")
    datasets = build_gpt_datasets(
        gpt_dataset_config(m.data, tokenizer, m.seed, cache_dir, corpus_dir),
        [horizon_steps(cfg) * gbs, t.limit_val_batches * gbs, t.limit_test_batches * gbs])
    micro = num_microbatches(m, world_size(cfg))
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    pin = use_cuda(t.accelerator)

    def steps(split: int, consumed: int, count: int) -> Iterator[StepData]:
        loader = iter(build_loader(datasets[split], consumed, m.micro_batch_size, dp_rank,
                                   dp_size, m.data.num_workers, pin))
        for _ in range(count):
            yield StepData([next(loader) for _ in range(micro)], gbs, gbs * m.encoder_seq_length)

    def train_steps(first: int, last: int, consumed: int) -> Iterator[StepData]:
        return steps(0, consumed, last - first)

    def eval_steps(split: str, batches: int) -> Optional[List[StepData]]:
        index = {"val": 1, "test": 2}[split]
        return None if datasets[index] is None else list(steps(index, 0, batches))

    plan = data_plan(datasets[0])
    hint = (f"Its index is built for max(trainer.max_steps, model.optim.sched.max_steps) x "
            f"model.global_batch_size samples (now {horizon_steps(cfg)} x {gbs}): to stop a run "
            "early, keep that horizon with model.optim.sched.max_steps (the saved plan's "
            "samples / global_batch_size) or use trainer.max_time. ")
    return Recipe("pretraining", train_steps, eval_steps, data_plan=plan, plan_hint=hint)


def run_pretraining(cfg: PretrainConfig) -> None:
    """The whole job: set up, restore, train, test. Collective across the launch."""
    cfg, precision = with_machine_precision(cfg)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    try:
        tokenizer, corpus_dir = build_tokenizer(cfg)
        trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size)
        recipe = pretraining_recipe(cfg, tokenizer, corpus_dir)
        m = cfg.model
        restore = Path(m.restore_from_path) if m.restore_from_path else None
        micro = num_microbatches(m, world_size(cfg))
        run(trainer, recipe, precision, restore,
            f"{micro} micro-batch(es) of {m.micro_batch_size} x {m.encoder_seq_length} tokens")
    finally:
        shutdown()
