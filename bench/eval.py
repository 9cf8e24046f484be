"""Evaluation and generation speed on this machine, against the anchor in the same run.

    python bench/eval.py [--checkpoint results/danube_tiny] [--limit 100] [--new-tokens 256]

1. lm-eval requests/s on the same model and tasks: our native model class on the danube
   checkpoint vs lm-eval's Hugging Face backend on its export (target: native >= 1.0x).
2. Generation tokens/s at --new-tokens new tokens: megatron-core's static engine with its KV
   cache vs a full forward per token (target: >= 5x).

Without --checkpoint, danube_tiny's step-0 weights are made in a scratch directory (speed
does not depend on what the weights learned). Prints a table; figures go to
docs/benchmarks.md with the CPU named.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _requests(results: dict) -> int:
    return sum(len(row["resps"]) for rows in results["samples"].values() for row in rows)


def _generation_rows(im, prompt_length: int, new_tokens: int):
    """Greedy tokens/s: megatron's static engine (KV cache) vs a full forward per token."""
    import torch

    from danube.inference.generate import Sampling, generate

    text = "def parse_args(argv):\n    return argv[1:]\n" * (prompt_length // 8 + 1)
    prompt = im.tokenizer.tokenize(text)[:prompt_length]
    generate(im, [prompt], Sampling(max_new_tokens=4))  # warm
    start = time.perf_counter()
    cached = generate(im, [prompt], Sampling(max_new_tokens=new_tokens))[0]
    cached_s = time.perf_counter() - start
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(len(cached.tokens)):
        ids.append(int(im.logits(torch.tensor([ids]))[0, -1].argmax()))
    full_s = time.perf_counter() - start
    made = len(cached.tokens)
    assert ids[len(prompt):] == cached.tokens, "KV-cached and recomputed greedy differ"
    where = f"{prompt_length}-token prompt + {made} new (context {im.max_length})"
    return [(f"generate, full recompute per token: {where}", f"{made / full_s:.1f} tok/s",
             "1.00x"),
            (f"generate, static engine + KV cache: {where}", f"{made / cached_s:.1f} tok/s",
             f"{full_s / cached_s:.2f}x")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tasks", default="arc_easy,piqa,boolq")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()

    import torch

    from bench.rounds import start_checkpoint
    from danube.conversion.exporter import export_hf
    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EvalSettings, _hf_lm, score
    from danube.inference.model import open_checkpoint, resolve_checkpoint
    from danube.runtime import cpu_capability, quiet_engine_notices

    quiet_engine_notices()
    scratch = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    checkpoint = resolve_checkpoint(args.checkpoint or start_checkpoint(scratch))
    hf_dir = export_hf(checkpoint, scratch / "hf")
    settings = EvalSettings(tasks=args.tasks.split(","), limit=args.limit,
                            batch_size=args.batch_size, log_samples=True, precision="32")
    rows = []
    with open_checkpoint(checkpoint, "32") as im:
        score(DanubeLM(im, args.batch_size), EvalSettings(tasks=settings.tasks, limit=2))  # warm
        start = time.perf_counter()
        native = score(DanubeLM(im, args.batch_size), settings)
        native_s = time.perf_counter() - start
        count = _requests(native)
        hf_lm = _hf_lm(hf_dir, settings)
        start = time.perf_counter()
        score(hf_lm, settings)
        hf_s = time.perf_counter() - start
        rows.append(("eval, lm-eval HF backend on the export", f"{count / hf_s:.1f} req/s",
                     "1.00x"))
        rows.append(("eval, native (danube checkpoint)", f"{count / native_s:.1f} req/s",
                     f"{hf_s / native_s:.2f}x"))

        rows += _generation_rows(im, 16, min(args.new_tokens, im.max_length - 16))
    # A longer context (danube_tiny's architecture at 1024 positions): a 512-token prompt, as
    # a chat with some history has, then --new-tokens.
    long_ckpt = resolve_checkpoint(start_checkpoint(
        scratch / "long", ["model.encoder_seq_length=1024", "model.max_position_embeddings=1024"]))
    with open_checkpoint(long_ckpt, "32") as long_im:
        rows += _generation_rows(long_im, 512, args.new_tokens)
    print(f"\n{checkpoint} ({im.config.num_layers} layers, hidden {im.config.hidden_size}), "
          f"fp32, CPU {cpu_capability()}, {torch.get_num_threads()} threads; "
          f"tasks {args.tasks}, {args.limit} docs each, {count} requests")
    width = max(len(r[0]) for r in rows)
    print(f"{'what':{width}}  {'speed':>14}  ratio")
    for what, speed, ratio in rows:
        print(f"{what:{width}}  {speed:>14}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
