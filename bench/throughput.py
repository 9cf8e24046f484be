"""Training throughput of danube vs HF transformers on the same model and the same batches.

    python bench/throughput.py                       # danube_tiny on this machine
    python bench/throughput.py --steps 30 model.micro_batch_size=4   # Hydra-style overrides

Each engine runs in its own process (so peak memory is its own) on the batches of the
config's data blend, in the same order:
  danube-fp32  launchers' path: megatron-core GPTModel, DDP, distributed-aware optimizer, fp32
  danube-bf16  the same with bf16 compute and fp32 main weights (trainer.precision=bf16-mixed)
  hf-fp32      transformers MistralForCausalLM (sdpa), torch AdamW, plain PyTorch loop, fp32
  hf-bf16      the same loop under torch.autocast(bfloat16)
The header names the CPU's vector capability and whether it has native bf16 (AVX512-BF16 or
AMX), and what `trainer.precision=auto` picks there: bf16 ratios hold only for that kind of CPU.
Engines alternate for --rounds rounds (a shared machine's load then hits them alike); each
round reports the median step over the timed steps, and the table shows each engine's best
round: tokens/s (per GPU: one process), peak memory allocated and reserved (workers set
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), ratio to hf-fp32, model FLOP/s and, with
--peak-tflops, MFU in three conventions (`danube.config.derived.training_flops_per_token`):
"MFU" attention counted causal within the window (the work done), "MFU-mg" Megatron-LM 0.16's
(causal over the whole sequence, the window ignored), "MFU-all" PaLM/MPT's (every key of the
sequence: inflated 72% at 16k with a 4096 window). A step is the config's global batch:
accumulate with model.global_batch_size = k x micro_batch_size, as a real run does.

    python bench/throughput.py --arch danube_1.8b --engines danube-bf16 --peak-tflops 989 \
        model.encoder_seq_length=2048 model.micro_batch_size=8 model.global_batch_size=8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

ENGINES = ("danube-fp32", "danube-bf16", "hf-fp32", "hf-bf16")


def architecture_overrides(name: str) -> list:
    """Overrides giving danube_tiny (the embedded data, no files needed) the architecture of
    config `name` (e.g. danube_1.8b): every ARCHITECTURE_FIELDS key, a one-GPU layout, its
    vocabulary rows (the tokenizer it names: 32000 for danube_1.8b)."""
    from danube.config.compose import compose_pretrain_config
    from danube.config.derived import ARCHITECTURE_FIELDS

    m = compose_pretrain_config(name, []).model
    values = {key: getattr(m, key) for key in ARCHITECTURE_FIELDS}
    values["vocab_size"] = values["vocab_size"] or 32000
    return [f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in values.items()] + ["model.tensor_model_parallel_size=1",
                                           "model.pipeline_model_parallel_size=1"]


def _setup(overrides):
    from danube.config import check_launch
    from danube.config.compose import compose_pretrain_config
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    cfg = compose_pretrain_config(os.environ.get("BENCH_CONFIG", "danube_tiny"), overrides + [
        "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
        "exp_manager.resume_if_exists=false", f"exp_manager.exp_dir={os.environ['BENCH_DIR']}",
    ])
    check_launch(cfg)
    from danube.training.loop import with_machine_precision

    return with_machine_precision(cfg)[0]


def run_danube(overrides, steps, warmup, precision: str):
    import torch

    from danube.training.distributed import init_distributed
    from danube.training.loop import build_trainer
    from danube.training.pretrain import build_tokenizer, pretraining_recipe
    from danube.training.step import report_means, train_step

    cfg = _setup([*overrides, f"trainer.precision={precision}"])
    init_distributed(cfg.model, cfg.trainer.accelerator)
    tokenizer, corpus = build_tokenizer(cfg)
    trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size)
    batches = pretraining_recipe(cfg, tokenizer, corpus).train_steps(0, warmup + steps, 0)
    times = []
    for data in batches:
        start = time.perf_counter()
        totals, _, _ = train_step(trainer.model, trainer.optimizer, trainer.scheduler,
                                  data.micro_batches, trainer.device)
        loss = report_means(totals, ["lm loss"])["lm loss"]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return cfg, tokenizer.vocab_size, times[warmup:], loss


def run_hf(overrides, steps, warmup, bf16: bool):
    import torch
    from megatron.core import parallel_state
    from transformers import MistralConfig, MistralForCausalLM

    from danube.training.distributed import init_distributed
    from danube.training.pretrain import build_tokenizer, pretraining_recipe

    cfg = _setup(overrides)
    m = cfg.model
    init_distributed(m, cfg.trainer.accelerator)
    tokenizer, corpus = build_tokenizer(cfg)
    batches = pretraining_recipe(cfg, tokenizer, corpus).train_steps(0, warmup + steps, 0)
    parallel_state.destroy_model_parallel()
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    hf_config = MistralConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        sliding_window=m.window_size, max_position_embeddings=m.max_position_embeddings,
        rope_theta=float(m.rotary_base), rms_norm_eps=m.layernorm_epsilon,
        tie_word_embeddings=m.share_embeddings_and_output_weights, attn_implementation="sdpa")
    model = MistralForCausalLM(hf_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=m.optim.lr, betas=tuple(m.optim.betas),
                                  weight_decay=m.optim.weight_decay, eps=m.optim.eps)
    times = []
    for data in batches:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for batch in data.micro_batches:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch["tokens"].to(device)).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), batch["labels"].to(device).flatten())
            (loss / len(data.micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return cfg, tokenizer.vocab_size, times[warmup:], loss.item()


def worker(engine, overrides, steps, warmup):
    import torch

    if engine.startswith("danube"):
        precision = "32" if engine == "danube-fp32" else "bf16-mixed"
        cfg, vocab, times, loss = run_danube(overrides, steps, warmup, precision)
    else:
        cfg, vocab, times, loss = run_hf(overrides, steps, warmup, bf16=engine == "hf-bf16")
    from danube.config.derived import padded_vocab_size, training_flops_per_token

    m = cfg.model
    tokens = m.global_batch_size * m.encoder_seq_length
    cuda = torch.cuda.is_available()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    reserved = torch.cuda.max_memory_reserved() if cuda else peak
    rows = padded_vocab_size(m.vocab_size or vocab, m)
    print(json.dumps({
        "engine": engine, "median_step_s": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times), "peak_mib": peak / 2**20,
        "reserved_mib": reserved / 2**20,
        "micro_batches": m.global_batch_size // m.micro_batch_size,
        "flops_per_token": training_flops_per_token(m, rows, m.encoder_seq_length),
        "flops_per_token_megatron": training_flops_per_token(m, rows, m.encoder_seq_length,
                                                             attention="megatron"),
        "flops_per_token_full": training_flops_per_token(m, rows, m.encoder_seq_length,
                                                         attention="full"),
        "seq_length": m.encoder_seq_length, "loss": float(loss),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "precision": engine.split("-")[1],
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak (e.g. 989 for H100 bf16 dense) to report MFU")
    parser.add_argument("--arch", default=None,
                        help="another config's architecture on danube_tiny's embedded data "
                             "(e.g. danube_1.8b)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.arch:
        args.overrides = [*architecture_overrides(args.arch), *args.overrides]
    if args.worker:
        # grow CUDA segments instead of fragmenting fixed ones (the 8 x 2048 fit is tight)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        return worker(args.worker, args.overrides, args.steps, args.warmup)

    import tempfile

    from rounds import best_of_rounds

    from danube.runtime import cpu_capability, cpu_native_bf16, resolve_precision

    with tempfile.TemporaryDirectory() as scratch:
        best = best_of_rounds(__file__, args.engines.split(","), args.rounds,
                              ["--steps", str(args.steps), "--warmup", str(args.warmup),
                               *args.overrides], "tokens_per_s", scratch)
    results = list(best.values())
    base = next((r["tokens_per_s"] for r in results if r["engine"] == "hf-fp32"), None)
    shown = " ".join(args.overrides[len(architecture_overrides(args.arch)):] if args.arch
                     else args.overrides)
    print(f"\nconfig {os.environ.get('BENCH_CONFIG', 'danube_tiny')}"
          f"{' with ' + args.arch + ' architecture' if args.arch else ''} {shown}"
          f" | best of {args.rounds} rounds of {args.steps} timed steps after {args.warmup}"
          f" | device {results[0]['gpu'] or results[0]['device']}"
          f" | torch threads {results[0]['threads']}")
    if results[0]["device"] == "cpu":
        print(f"CPU {cpu_capability()}, native bf16 (AVX512-BF16/AMX): "
              f"{'yes' if cpu_native_bf16() else 'no'}; trainer.precision=auto -> "
              f"{resolve_precision('auto', cuda=False).precision}")
    header = f"{'engine':<12} {'precision':<9} {'seq':>6} {'tokens/s':>10} {'vs hf-fp32':>10} " \
             f"{'peak MiB':>9} {'rsvd MiB':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFU-mg':>6} " \
             f"{'MFU-all':>7} {'loss':>7}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = mfu_mg = mfu_all = "-"
        if args.peak_tflops:
            def pct(key):
                return f"{100 * r['tokens_per_s'] * r[key] / 1e12 / args.peak_tflops:.1f}%"
            mfu, mfu_mg, mfu_all = (pct("flops_per_token"), pct("flops_per_token_megatron"),
                                    pct("flops_per_token_full"))
        r.update(tflops=tflops, mfu=mfu, mfu_megatron=mfu_mg, mfu_full=mfu_all)
        print(f"{r['engine']:<12} {r['precision']:<9} {r['seq_length']:>6} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>10} {r['peak_mib']:>9,.0f} "
              f"{r.get('reserved_mib', r['peak_mib']):>9,.0f} {tflops:>8.3f} "
              f"{mfu:>6} {mfu_mg:>6} {mfu_all:>7} {r['loss']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
