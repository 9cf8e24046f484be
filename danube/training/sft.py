"""Supervised fine-tuning: the SFT recipe for the one loop (its data and its loss
normalization), and the dry run that shows what would be trained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from danube.config.schema import SFTConfig
from danube.data.chat import ChatDataError
from danube.data.embedded_chat import resolve_chat_files
from danube.data.sft import (
    SFTDataset,
    build_sft_dataset,
    describe_sample,
    global_batch_indices,
    pack_rows,
    step_batches,
    steps_per_epoch,
)
from danube.data.tokenizer import Tokenizer, load_tokenizer
from danube.runtime import PrecisionChoice
from danube.training.data_plan import chat_data_plan


def _datasets(cfg: SFTConfig, tokenizer: Tokenizer) -> Tuple[SFTDataset, Optional[SFTDataset]]:
    """Train and validation conversations, encoded; bad records raise ChatDataError (file and
    line) before any model is built."""
    data, cache = cfg.model.data, cfg.model.data.embedded_cache_dir
    answer_only = cfg.model.answer_only_loss
    sets = []
    for ds in (data.train_ds, data.validation_ds):
        if ds.file_path is None:
            sets.append(None)
            continue
        ds = replace(ds, file_path=resolve_chat_files(ds.file_path, cache and Path(cache)))
        sets.append(build_sft_dataset(ds, data, tokenizer, answer_only, data.on_error))
    train, val = sets
    if len(train.samples) < data.train_ds.global_batch_size:
        raise ChatDataError(
            f"model.data.train_ds has {len(train.samples)} trainable conversation(s) "
            f"({train.stats}), fewer than one global batch "
            f"({data.train_ds.global_batch_size}): add data or lower model.global_batch_size")
    validates = cfg.trainer.limit_val_batches > 0
    if val is not None and validates and len(val.samples) < data.validation_ds.global_batch_size:
        raise ChatDataError(
            f"model.data.validation_ds has {len(val.samples)} usable conversation(s) "
            f"({val.stats}), fewer than one global batch "
            f"({data.validation_ds.global_batch_size}): validation would be skipped. Give it at "
            f"least {data.validation_ds.global_batch_size}, or lower "
            "model.data.validation_ds.global_batch_size, or set trainer.limit_val_batches=0")
    return train, val


def with_epoch_steps(cfg, items: int, global_batch_size: int):
    """trainer.max_steps bounded by trainer.max_epochs (whichever comes first), an epoch being
    `items` (conversations, pairs) // global_batch_size steps (SFT, DPO)."""
    t = cfg.trainer
    if t.max_epochs is None:
        return cfg
    by_epochs = t.max_epochs * (items // global_batch_size)
    steps = by_epochs if t.max_steps < 0 else min(t.max_steps, by_epochs)
    return replace(cfg, trainer=replace(t, max_steps=steps))


def _batching(ds, dp_rank: int, dp_size: int, tokenizer: Tokenizer) -> dict:
    return dict(seq_length=ds.max_seq_length, packed=ds.packed_sequence,
                micro_batch_size=ds.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                pad_id=max(tokenizer.pad, 0))


def sft_recipe(cfg: SFTConfig, tokenizer: Tokenizer, train: SFTDataset,
               val: Optional[SFTDataset]):
    """The SFT recipe: per-step micro-batches of conversations, loss normalized over the
    trained tokens of the whole global batch."""
    from megatron.core import parallel_state

    from danube.training.loop import Recipe, StepData

    data, seed = cfg.model.data, cfg.model.seed
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def steps(dataset: SFTDataset, ds, first: int, last: int) -> Iterator[StepData]:
        batching = _batching(ds, dp_rank, dp_size, tokenizer)
        for step in range(first, last):
            indices = global_batch_indices(len(dataset.samples), ds.global_batch_size, step,
                                           seed, ds.shuffle)
            batch = step_batches(dataset, indices, **batching)
            yield StepData(batch.micro_batches, batch.samples, batch.trained_tokens)

    def train_steps(first: int, last: int, consumed: int) -> Iterator[StepData]:
        return steps(train, data.train_ds, first, last)

    def eval_steps(split: str, batches: int) -> Optional[List[StepData]]:
        if split != "val" or val is None:
            return None
        available = steps_per_epoch(val, data.validation_ds.global_batch_size)
        if available == 0:
            return None
        return list(steps(val, data.validation_ds, 0, min(batches, available)))

    cache = data.embedded_cache_dir and Path(data.embedded_cache_dir)
    files = resolve_chat_files(data.train_ds.file_path, cache)
    plan = chat_data_plan(files, len(train.samples), data.train_ds.global_batch_size, seed,
                          data.train_ds.shuffle)
    return Recipe("sft", train_steps, eval_steps, per_token_loss=True, data_plan=plan)


def run_sft(cfg: SFTConfig, precision: PrecisionChoice, downstream=None) -> None:
    """The whole job (collective): data first (bad records stop it before anything is built or
    written), then the shared loop from the starting checkpoint."""
    from danube.training.distributed import init_distributed, shutdown
    from danube.training.loop import build_trainer, run

    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    train, val = _datasets(cfg, tokenizer)
    cfg = with_epoch_steps(cfg, len(train.samples), cfg.model.data.train_ds.global_batch_size)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    try:
        trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size, per_token_loss=True)
        recipe = sft_recipe(cfg, tokenizer, train, val)
        ds = cfg.model.data.train_ds
        describe = (f"{len(train.samples)} conversations ({train.stats['truncated']} truncated, "
                    f"{train.stats['dropped_no_answer_left']} dropped), "
                    f"{ds.global_batch_size} per step, {'packed' if ds.packed_sequence else 'one'}"
                    f" per row of {ds.max_seq_length}")
        run(trainer, recipe, precision, Path(cfg.model.restore_from_path), describe,
            downstream)
    finally:
        shutdown()


def dry_run(cfg: SFTConfig, samples: int) -> str:
    """What training would see, without a model: the first global batch's rows token by token
    (label, trained or not, position, conversation boundary) and a summary."""
    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    train, _ = _datasets(cfg, tokenizer)
    ds = cfg.model.data.train_ds
    indices = global_batch_indices(len(train.samples), ds.global_batch_size, 0, cfg.model.seed,
                                   ds.shuffle)
    chosen = [train.samples[i] for i in indices]
    rows = pack_rows([s.positions for s in chosen], ds.max_seq_length, ds.packed_sequence)
    lines = []
    for r, row in enumerate(rows[:samples]):
        lines.append(f"row {r}: {len(row)} conversation(s), "
                     f"{sum(chosen[i].positions for i in row)} of {ds.max_seq_length} positions")
        lines += describe_sample([chosen[i] for i in row], tokenizer, ds.max_seq_length,
                                 ds.packed_sequence)
    labels = sum(s.positions for s in train.samples)
    trained = sum(int(s.trained[1:].sum()) for s in train.samples)
    st = train.stats
    lines += ["", "summary (train_ds):",
              f"  conversations kept        {len(train.samples)} of {st['records']} records",
              f"  trained label tokens      {trained} of {labels} ({trained / labels:.1%})",
              f"  truncated                 {st['truncated']}",
              f"  dropped: no answer left   {st['dropped_no_answer_left']}",
              f"  dropped: too short        {st['dropped_too_short']}",
              f"  skipped bad records       {st['skipped_bad_records']}",
              f"  answers ending in a trained token (end of turn): "
              f"{st['answers_ending_trained']} of {len(train.samples)}",
              f"  rows in the first global batch: {len(rows)} "
              f"({'packed' if ds.packed_sequence else 'one conversation per row'})"]
    return "\n".join(lines)
