"""DPO throughput: pairs/s with the reference on the fly vs precomputed, packed vs unpacked,
full vs LoRA, and the peak memory of each.

    python bench/dpo.py                       # danube_tiny_dpo from a fresh danube_tiny init
    python bench/dpo.py --steps 20 --rounds 3 model.encoder_seq_length=256

Modes (all the same pairs per step, global_batch_size pairs):
    unpacked    full fine-tuning, reference on the fly (its weights swapped in from the CPU)
    precompute  the same, reference log-probs computed once before training and read back
    packed      on the fly, pairs packed into rows of 2 x seq_length
    lora        unpacked, LoRA r=4 alpha=16 on all four linears (reference: adapters off)
A step's time includes its reference pass (on the fly). Each mode runs in its own process
(its peak RSS is its own), alternating for --rounds rounds; the table shows each mode's best
round (median step time), pairs/s, the ratio to unpacked and peak memory, with the CPU named;
the precompute mode also shows its one-time pass.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

MODES = ("unpacked", "precompute", "packed", "lora")


def worker(mode: str, overrides, steps: int, warmup: int) -> None:
    from sft import LORA

    from danube.config import check_launch
    from danube.config.compose import compose_dpo_config
    from danube.config.finetune import from_start_checkpoint
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    cfg = from_start_checkpoint(compose_dpo_config("danube_tiny_dpo", [
        *overrides, f"model.data.packed_sequence={mode == 'packed'}",
        f"model.dpo.ref_log_probs={'precompute' if mode == 'precompute' else 'on_the_fly'}",
        *(LORA if mode == "lora" else []),
        "trainer.max_epochs=null", f"trainer.max_steps={steps + warmup}",
        "trainer.limit_val_batches=0", "exp_manager.resume_if_exists=false",
        "model.data.data_prefix.validation=null",
        f"model.dpo.ref_log_probs_cache_dir={os.environ['BENCH_DIR']}/{mode}/cache",
        f"exp_manager.exp_dir={os.environ['BENCH_DIR']}/{mode}"]))
    check_launch(cfg)
    from megatron.core import parallel_state

    from danube.data.tokenizer import load_tokenizer
    from danube.training.distributed import init_distributed
    from danube.training.dpo import (
        METRICS,
        Reference,
        _batching,
        _datasets,
        dpo_loss,
        dpo_recipe,
        reference_cache,
    )
    from danube.training.loop import build_trainer, load_initial, with_machine_precision
    from danube.training.step import train_step

    cfg, precision = with_machine_precision(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    datasets = _datasets(cfg, tokenizer)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size, per_token_loss=True)
    load_initial(trainer, Path(cfg.model.restore_from_path))
    lora, precompute = mode == "lora", mode == "precompute"
    reference = Reference(trainer.model, trainer.device, lora, snapshot=not precompute)
    batching = _batching(cfg, tokenizer, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size())
    caches, pass_s = {}, 0.0
    if precompute:
        start = time.perf_counter()
        caches["train"] = reference_cache(cfg, reference, datasets["train"], "train", batching,
                                          trainer.log)
        pass_s = time.perf_counter() - start
    recipe = dpo_recipe(cfg, datasets, batching, reference, caches)
    loss_fn = partial(dpo_loss, cfg.model.dpo)
    times, pairs = [], []
    steps_iter = recipe.train_steps(0, steps + warmup, 0)
    for _ in range(steps + warmup):
        start = time.perf_counter()
        data = next(steps_iter)  # on the fly: the reference pass runs here
        train_step(trainer.model, trainer.optimizer, trainer.scheduler, data.micro_batches,
                   trainer.device, loss_fn, METRICS)
        times.append(time.perf_counter() - start)
        pairs.append(data.samples - data.counts["masked_pairs"])
    median = statistics.median(times[warmup:])
    print(json.dumps({"mode": mode, "median_step_s": median,
                      "pairs_per_step": statistics.mean(pairs[warmup:]),
                      "pairs_per_s": statistics.mean(pairs[warmup:]) / median,
                      "precompute_pass_s": pass_s, "pairs_total": len(datasets["train"].pairs),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "precision": cfg.trainer.precision}))


def main() -> None:
    from rounds import fine_tuning_bench

    run = fine_tuning_bench(__file__, __doc__, MODES, 10, "DPO", "pairs_per_s", worker)
    if run is None:
        return
    _, best, title = run
    base = best["unpacked"]["pairs_per_s"]
    print(title)
    header = (f"{'mode':<10} {'pairs/step':>10} {'step s':>7} {'pairs/s':>8} "
              f"{'vs unpacked':>11} {'peak MiB':>9}  note")
    print(header + "\n" + "-" * len(header))
    for mode in MODES:
        r = best[mode]
        note = (f"one reference pass over {r['pairs_total']} pairs: {r['precompute_pass_s']:.1f}"
                " s" if mode == "precompute" else "")
        print(f"{mode:<10} {r['pairs_per_step']:>10.1f} {r['median_step_s']:>7.3f} "
              f"{r['pairs_per_s']:>8.2f} {r['pairs_per_s'] / base:>10.2f}x "
              f"{r['peak_mib']:>9,.0f}  {note}")


if __name__ == "__main__":
    sys.exit(main())
