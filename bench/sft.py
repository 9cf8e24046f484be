"""SFT throughput: trained (non-pad, unmasked) tokens/s, packed vs unpacked, on the demo data.

    python bench/sft.py                       # danube_tiny_sft from a fresh danube_tiny init
    python bench/sft.py --steps 20 --rounds 3 model.encoder_seq_length=256

Both modes train the same conversations per step (global_batch_size counts conversations);
packing only changes how many rows they take. Each mode runs in its own process, alternating
for --rounds rounds; the table shows each mode's best round (median step time over the timed
steps), its trained tokens/s and the ratio to unpacked, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("unpacked", "packed")


def start_checkpoint(scratch: Path) -> Path:
    """danube_tiny's step-0 weights (the bench measures speed, not quality)."""
    subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"),
                    "trainer.max_steps=0", "model.optim.sched.max_steps=300",
                    "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
                    f"exp_manager.exp_dir={scratch}", "exp_manager.name=init"],
                   check=True, capture_output=True, cwd=ROOT)
    return scratch / "init"


def worker(mode: str, overrides, steps: int, warmup: int) -> None:
    from danube.config import check_launch
    from danube.config.compose import compose_sft_config
    from danube.config.finetune import from_start_checkpoint
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    cfg = from_start_checkpoint(compose_sft_config("danube_tiny_sft", [
        *overrides, f"model.data.train_ds.packed_sequence={mode == 'packed'}",
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
    print(json.dumps({"mode": mode, "median_step_s": median,
                      "trained_tokens_per_step": statistics.mean(tokens[warmup:]),
                      "rows_per_step": statistics.mean(rows[warmup:]),
                      "trained_tokens_per_s": statistics.mean(tokens[warmup:]) / median,
                      "precision": cfg.trainer.precision}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="SFT config overrides, key=value")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.overrides, args.steps, args.warmup)
    from danube.runtime import cpu_capability, cpu_native_bf16

    best = {}
    with tempfile.TemporaryDirectory() as scratch:
        init = start_checkpoint(Path(scratch))
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                     "--warmup", str(args.warmup), f"model.restore_from_path={init}",
                     *args.overrides],
                    capture_output=True, text=True, cwd=ROOT,
                    env={**os.environ, "BENCH_DIR": scratch})
                if out.returncode != 0:
                    sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if mode not in best or result["trained_tokens_per_s"] > \
                        best[mode]["trained_tokens_per_s"]:
                    best[mode] = result
    base = best["unpacked"]["trained_tokens_per_s"]
    print(f"\ndanube_tiny_sft {' '.join(args.overrides)} | best of {args.rounds} rounds of "
          f"{args.steps} timed steps | CPU {cpu_capability()} (native bf16: "
          f"{'yes' if cpu_native_bf16() else 'no'}), precision {best['packed']['precision']}")
    header = (f"{'mode':<9} {'rows/step':>9} {'trained tok/step':>16} {'step s':>7} "
              f"{'trained tok/s':>13} {'vs unpacked':>11}")
    print(header + "\n" + "-" * len(header))
    for mode in MODES:
        r = best[mode]
        print(f"{mode:<9} {r['rows_per_step']:>9.1f} {r['trained_tokens_per_step']:>16,.0f} "
              f"{r['median_step_s']:>7.3f} {r['trained_tokens_per_s']:>13,.0f} "
              f"{r['trained_tokens_per_s'] / base:>10.2f}x")


if __name__ == "__main__":
    main()
