"""FlexAttention at Danube's head dim 80 vs 128 at equal attention FLOPs (GPU).

    python bench/flex_head_dim.py [--seq 16384] [--window 4096] [--json out.json]

Recent torch pads a head dim that is not a power of two up to the next one inside
FlexAttention's kernel (80 -> 128: 37.5% of its attention work wasted, if so). This times the
compiled kernel forward + backward, bf16, on one sequence of `--seq` tokens with the sliding
window, for 32 heads x 80 (H2O-Danube-1.8B, 8 KV groups) against 20 heads x 128 (the same
2560 query width, 4 KV groups: 5 queries per group against Danube's 4), and reports
TFLOP/s counted causal within the window for each, and their ratio. The anchor (128, a power
of two) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(heads: int, groups: int, head_dim: int, seq: int, window: int, steps: int) -> dict:
    import torch

    from danube.config.derived import mean_keys_per_query
    from danube.model.attention import _compiled_flex_attention, window_block_mask

    flex = _compiled_flex_attention()
    block_mask = window_block_mask(seq, window - 1, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(h):
        return torch.randn(1, h, seq, head_dim, generator=gen, device="cuda",
                           dtype=torch.bfloat16, requires_grad=True)

    q, k, v = rand(heads), rand(groups), rand(groups)
    r = torch.randn(1, heads, seq, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)

    def step():
        out = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        (out * r).sum().backward()

    for _ in range(3):  # compile, autotune, warm
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    # forward 2 matmuls (QK^T, AV) x 2 FLOPs, backward 2x forward: 12 x heads x dim x keys
    flops = 12 * heads * head_dim * mean_keys_per_query(seq, window) * seq
    return {"heads": heads, "groups": groups, "head_dim": head_dim, "seq": seq,
            "window": window, "median_s": seconds, "tflops": flops / seconds / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/flex_head_dim.py needs a CUDA GPU (FlexAttention compiles "
                         "with Triton there)")
    rows = [measure(32, 8, 80, args.seq, args.window, args.steps),
            measure(20, 4, 128, args.seq, args.window, args.steps)]
    print(f"FlexAttention fwd+bwd, bf16, {args.seq} tokens, window {args.window}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'heads x dim':<12} {'groups':>6} {'ms':>8} {'TFLOP/s':>8}")
    for row in rows:
        print(f"{row['heads']} x {row['head_dim']:<7} {row['groups']:>6} "
              f"{1000 * row['median_s']:>8.2f} {row['tflops']:>8.1f}")
    ratio = rows[0]["tflops"] / rows[1]["tflops"]
    print(f"head dim 80 / 128 at equal FLOPs: {ratio:.2f}x "
          f"({'padding cost visible' if ratio < 0.8 else 'no large padding cost'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio_80_to_128": ratio}))


if __name__ == "__main__":
    main()
