"""Pretraining: the pretraining recipe (megatron-core GPTDataset blends, Megatron's sample
order) for the one loop in `danube.training.loop`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, List, Optional

from megatron.core import parallel_state

from danube.config.derived import (
    num_microbatches,
    schedule_counts_tokens,
    stage_steps,
    world_size,
)
from danube.config.schema import PretrainConfig
from danube.data.embedded import embedded_tokenizer, ensure_embedded_corpus
from danube.data.gpt import (
    build_gpt_datasets,
    build_loader,
    close_loader,
    data_plan,
    gpt_dataset_config,
)
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
from danube.training.signals import children_ignore_stop_signals

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
    """The steps the training index is built for (one stage): the schedule's horizon
    (model.optim.sched.max_steps, default trainer.max_steps), or trainer.max_steps if larger.
    A run stopped early by a lower trainer.max_steps with the schedule's horizon kept reads
    its data in the same order as the full run (a source read for several epochs is shuffled
    over all of them, so the index size decides its order)."""
    return max(cfg.trainer.max_steps, cfg.model.optim.sched.max_steps or 0)


@dataclass(frozen=True)
class Stage:
    """A stretch of steps at one sequence length and global batch size."""

    first_step: int
    steps: int
    seq_length: int
    global_batch_size: int
    first_sample: int
    """Training samples of the stages before (where this stage's consumed count starts)."""
    micro_batch_size: int
    data_prefix: Any = None
    """The stage's own blend, or None for the run's."""


def stages_of(cfg: PretrainConfig) -> List[Stage]:
    """model.seq_length_stages as Stages; without any, one stage for the horizon."""
    m = cfg.model
    if not m.seq_length_stages:
        return [Stage(0, horizon_steps(cfg), m.encoder_seq_length, m.global_batch_size, 0,
                      m.micro_batch_size)]
    stages, step, sample = [], 0, 0
    for spec, steps in zip(m.seq_length_stages, stage_steps(m)):
        stages.append(Stage(step, steps, spec.encoder_seq_length, spec.global_batch_size,
                            sample, spec.micro_batch_size or m.micro_batch_size,
                            spec.data_prefix))
        step, sample = step + steps, sample + steps * spec.global_batch_size
    return stages


def pretraining_recipe(cfg: PretrainConfig, tokenizer, corpus_dir) -> Recipe:
    """GPTDataset splits read in Megatron's order: global batch k of a stage is samples
    k*G..(k+1)*G-1 of its split, this rank taking its micro-batch slices (collective: builds
    the index caches). With seq_length_stages each stage has its own datasets at its length,
    its index sized for its steps; validation reads the current stage's."""
    m, t = cfg.model, cfg.trainer
    cache_dir = Path(m.data.index_mapping_dir or exp_dir(cfg.exp_manager) / "index_cache")
    stages = stages_of(cfg)
    datasets = [build_gpt_datasets(
        gpt_dataset_config(replace(m.data, seq_length=st.seq_length,
                                   data_prefix=st.data_prefix or m.data.data_prefix),
                           tokenizer, m.seed, cache_dir, corpus_dir),
        [st.steps * st.global_batch_size, t.limit_val_batches * st.global_batch_size,
         t.limit_test_batches * st.global_batch_size]) for st in stages]
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    pin = use_cuda(t.accelerator)
    ramp = bool(m.seq_length_stages)
    by_tokens = schedule_counts_tokens(m)  # the LR schedule advances by each step's tokens
    current = {"stage": 0}

    def stage_at(step: int) -> int:
        return max(i for i, st in enumerate(stages) if st.first_step <= step)

    def steps(stage: int, split: int, consumed: int, count: int) -> Iterator[StepData]:
        st = stages[stage]
        micro = st.global_batch_size // (st.micro_batch_size * dp_size)
        with children_ignore_stop_signals():  # data-loader workers start here
            loader = iter(build_loader(datasets[stage][split], consumed, st.micro_batch_size,
                                       dp_rank, dp_size, m.data.num_workers, pin, m.seed))
        try:
            counts = {"seq_length": st.seq_length} if ramp else {}
            for _ in range(count):
                tokens = st.global_batch_size * st.seq_length
                yield StepData([next(loader) for _ in range(micro)], st.global_batch_size,
                               tokens, counts, tokens if by_tokens else 1)
        finally:  # the generator closed (the loop's end, a stop, an error): workers end now
            close_loader(loader)

    def train_steps(first: int, last: int, consumed: int) -> Iterator[StepData]:
        step = first
        while step < last:
            stage = stage_at(step)
            st = stages[stage]
            end = min(last, st.first_step + st.steps) if stage + 1 < len(stages) else last
            in_stage = consumed - st.first_sample
            if ramp and in_stage != (step - st.first_step) * st.global_batch_size:
                raise ValueError(
                    f"consumed samples {consumed} at step {step} do not match the stages "
                    f"(stage {stage} starts at step {st.first_step}, sample {st.first_sample}, "
                    f"{st.global_batch_size} per step): the checkpoint was written under "
                    "other model.seq_length_stages")
            current["stage"] = stage
            yield from steps(stage, 0, in_stage, end - step)
            consumed += (end - step) * st.global_batch_size
            step = end

    def eval_steps(split: str, batches: int) -> Optional[List[StepData]]:
        index = {"val": 1, "test": 2}[split]
        stage = current["stage"]
        if datasets[stage][index] is None:
            return None
        return list(steps(stage, index, 0, batches))

    train_sets = [ds[0] for ds in datasets]
    if any(ds is None for ds in train_sets):  # trainer.max_steps=0: nothing is ever read
        plan, hint = None, ""
    elif ramp:
        plan = {"stages": [{"encoder_seq_length": st.seq_length,
                            "global_batch_size": st.global_batch_size, "steps": st.steps,
                            **data_plan(ds)} for st, ds in zip(stages, train_sets)]}
        hint = ("Its stages (model.seq_length_stages) fix the data order from step 0: stages "
                "already run must stay as they were; a change to stages not yet started can be "
                "accepted as below. ")
    else:
        plan = data_plan(train_sets[0])
        hint = (f"Its index is built for max(trainer.max_steps, model.optim.sched.max_steps) x "
                f"model.global_batch_size samples (now {horizon_steps(cfg)} x "
                f"{m.global_batch_size}): to stop a run early, keep that horizon with "
                "model.optim.sched.max_steps (the saved plan's samples / global_batch_size) or "
                "use trainer.max_time. ")
    return Recipe("pretraining", train_steps, eval_steps, data_plan=plan, plan_hint=hint)


def run_pretraining(cfg: PretrainConfig, downstream=None) -> None:
    """The whole job: set up, restore, train, test. Collective across the launch.
    `downstream`: model.downstream_eval's scorer (danube.launch.downstream_scorer)."""
    cfg, precision = with_machine_precision(cfg)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    try:
        tokenizer, corpus_dir = build_tokenizer(cfg)
        trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size)
        recipe = pretraining_recipe(cfg, tokenizer, corpus_dir)
        m = cfg.model
        restore = Path(m.restore_from_path) if m.restore_from_path else None
        if m.seq_length_stages:
            describe = "stages " + ", ".join(
                f"{st.seq_length} x {st.global_batch_size} (micro-batch {st.micro_batch_size}) "
                f"from step {st.first_step}" for st in stages_of(cfg))
        else:
            micro = num_microbatches(m, world_size(cfg))
            describe = (f"{micro} micro-batch(es) of {m.micro_batch_size} x "
                        f"{m.encoder_seq_length} tokens")
        run(trainer, recipe, precision, restore, describe, downstream)
    finally:
        shutdown()
