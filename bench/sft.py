"""SFT throughput: trained (non-pad, unmasked) tokens/s, packed vs unpacked, full vs LoRA.

    python bench/sft.py                       # danube_tiny_sft from a fresh danube_tiny init
    python bench/sft.py --steps 20 --rounds 3 model.encoder_seq_length=256

Every mode trains the same conversations per step (global_batch_size counts conversations);
packing only changes how many rows they take. `lora` is packed with LoRA r=4, alpha=16 on all
four linears (H2O-Danube's DPO setting). Each mode runs in its own process (so its peak RSS is
its own), alternating for --rounds rounds; the table shows each mode's best round (median step
time over the timed steps), trained tokens/s, the ratio to unpacked and peak memory, with the
CPU named; then the optimizer-state arithmetic of full vs LoRA for the 1.8B layout.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

MODES = ("unpacked", "packed", "lora")
LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.alpha=16",
        "model.peft.lora_tuning.target_modules=[attention_qkv,attention_dense,mlp_fc1,mlp_fc2]"]


def worker(mode: str, overrides, steps: int, warmup: int) -> None:
    from danube.config import check_launch
    from danube.config.compose import compose_sft_config
    from danube.config.finetune import from_start_checkpoint
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    cfg = from_start_checkpoint(compose_sft_config("danube_tiny_sft", [
        *overrides, f"model.data.train_ds.packed_sequence={mode != 'unpacked'}",
        *(LORA if mode == "lora" else []),
        "trainer.max_epochs=null", f"trainer.max_steps={steps + warmup}",
        "trainer.limit_val_batches=0", "exp_manager.resume_if_exists=false",
        f"exp_manager.exp_dir={os.environ['BENCH_DIR']}/{mode}"]))
    check_launch(cfg)
    from danube.data.tokenizer import load_tokenizer
    from danube.training.distributed import init_distributed
    from danube.training.loop import build_trainer, with_machine_precision
    from danube.training.sft import _datasets, sft_recipe
    from danube.training.step import train_step

    cfg, precision = with_machine_precision(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    train, val = _datasets(cfg, tokenizer)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size, per_token_loss=True)
    recipe = sft_recipe(cfg, tokenizer, train, val)
    times, tokens, rows = [], [], []
    for data in recipe.train_steps(0, steps + warmup, 0):
        start = time.perf_counter()
        train_step(trainer.model, trainer.optimizer, trainer.scheduler, data.micro_batches,
                   trainer.device)
        times.append(time.perf_counter() - start)
        tokens.append(data.tokens)
        rows.append(sum(len(b["tokens"]) for b in data.micro_batches))
    median = statistics.median(times[warmup:])
    trainable = sum(p.numel() for chunk in trainer.model for p in chunk.parameters()
                    if p.requires_grad)
    print(json.dumps({"mode": mode, "median_step_s": median, "trainable": trainable,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "trained_tokens_per_step": statistics.mean(tokens[warmup:]),
                      "rows_per_step": statistics.mean(rows[warmup:]),
                      "trained_tokens_per_s": statistics.mean(tokens[warmup:]) / median,
                      "precision": cfg.trainer.precision}))


def main() -> None:
    from rounds import fine_tuning_bench

    run = fine_tuning_bench(__file__, __doc__, MODES, 15, "SFT", "trained_tokens_per_s", worker)
    if run is None:
        return
    _, best, title = run
    base = best["unpacked"]["trained_tokens_per_s"]
    print(title)
    header = (f"{'mode':<9} {'rows/step':>9} {'trained tok/step':>16} {'step s':>7} "
              f"{'trained tok/s':>13} {'vs unpacked':>11} {'trainable':>10} {'peak MiB':>9}")
    print(header + "\n" + "-" * len(header))
    for mode in MODES:
        r = best[mode]
        print(f"{mode:<9} {r['rows_per_step']:>9.1f} {r['trained_tokens_per_step']:>16,.0f} "
              f"{r['median_step_s']:>7.3f} {r['trained_tokens_per_s']:>13,.0f} "
              f"{r['trained_tokens_per_s'] / base:>10.2f}x {r['trainable']:>10,} "
              f"{r['peak_mib']:>9,.0f}")
    print(danube_1_8b_memory())


def danube_1_8b_memory() -> str:
    """Training state per parameter in bf16 mixed precision with Adam (megatron: bf16 weight
    2 B, fp32 main weight 4 B, fp32 main grad 4 B, Adam m and v 8 B) for full fine-tuning vs
    LoRA r=4 on the four linears (frozen base: its bf16 weight only)."""
    layers, hidden, ffn, heads, groups, vocab = 24, 2560, 6912, 32, 8, 32000
    qkv_out = hidden + 2 * hidden // heads * groups
    per_layer = (hidden * qkv_out + hidden * hidden + hidden * 2 * ffn + ffn * hidden + 2 * hidden)
    total = layers * per_layer + 2 * vocab * hidden + hidden
    r = 4
    adapters = layers * r * ((hidden + qkv_out) + (hidden + hidden) + (hidden + 2 * ffn)
                             + (ffn + hidden))
    full = total * 18
    lora = total * 2 + adapters * 18
    gib = 2 ** 30
    return (f"\ndanube_1.8b, computed: {total / 1e9:.2f}B parameters; full fine-tuning "
            f"{full / gib:.1f} GiB of weights, grads and Adam state; LoRA r={r} "
            f"({adapters / 1e6:.2f}M adapter parameters) {lora / gib:.1f} GiB "
            f"({full / lora:.1f}x less), before activations")


if __name__ == "__main__":
    main()
