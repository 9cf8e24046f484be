"""Peak memory of the Hugging Face converters against the size of the model.

    python bench/conversion_memory.py [--layers 16 --hidden 1024 --ffn 2816]

Builds a random MistralForCausalLM (fp32 safetensors), then runs conversion/hf_to_mcore.py
and conversion/mcore_to_hf.py (shards of --shard-mb) in their own processes and prints each
one's peak RSS next to the weights' size and a process that only imports the same libraries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BASELINE = ("import torch, megatron.core, transformers, safetensors; "
             "import danube.conversion.importer, danube.conversion.exporter")


# Runs a script (or code) in this interpreter, then prints its own peak RSS in KiB.
_MEASURE = ("import resource, runpy, sys\n"
            "target, sys.argv = sys.argv[1], sys.argv[1:]\n"
            "exec(target) if target.startswith('import') else runpy.run_path(target, "
            "run_name='__main__')\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def _peak_rss_mib(*args) -> tuple:
    """Run a script (path + arguments) or import statement; its peak RSS (MiB), seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], cwd=ROOT,
                          check=True, capture_output=True, text=True)
    return int(done.stderr.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


_MAKE_MODEL = """
import sys, json
from pathlib import Path
from transformers import MistralConfig, MistralForCausalLM
from danube.data.tokenizer import train_byte_level_bpe
out, layers, hidden, ffn, vocab, shard_mb = sys.argv[1], *map(int, sys.argv[2:])
model = MistralForCausalLM(MistralConfig(
    vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
    num_attention_heads=hidden // 64, num_key_value_heads=4, sliding_window=1024))
model.save_pretrained(out, max_shard_size=f"{shard_mb}MB")
train_byte_level_bpe(["some text to train on"] * 10, 600).save(str(Path(out) / "tokenizer.json"))
print(json.dumps({"model_mib": sum(p.numel() * 4 for p in model.parameters()) / 2**20,
                  "layer_mib": sum(p.numel() * 4 for p in model.model.layers[0].parameters())
                  / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=100)
    args = parser.parse_args()
    # This process stays small (no torch): a child's peak RSS counts what it was forked from.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = subprocess.run(
            [sys.executable, "-c", _MAKE_MODEL, tmp / "hf", str(args.layers), str(args.hidden),
             str(args.ffn), str(args.vocab), str(args.shard_mb)],
            cwd=ROOT, check=True, capture_output=True, text=True)
        sizes = json.loads(made.stdout.strip().splitlines()[-1])
        rows = [
            ("python + imports only", *_peak_rss_mib(_BASELINE)),
            ("hf_to_mcore (import)", *_peak_rss_mib(
                "conversion/hf_to_mcore.py", tmp / "hf", tmp / "ours")),
            ("mcore_to_hf (export)", *_peak_rss_mib(
                "conversion/mcore_to_hf.py", tmp / "ours" / "checkpoint", tmp / "back",
                "--max-shard-size", f"{args.shard_mb}MB")),
        ]
    print(f"\nmodel: {args.layers} layers x hidden {args.hidden}, ffn {args.ffn}, vocab "
          f"{args.vocab}: {sizes['model_mib']:,.0f} MiB of fp32 weights, "
          f"{sizes['layer_mib']:,.0f} MiB per layer; shards of {args.shard_mb} MB")
    print(f"{'process':<24} {'peak RSS MiB':>13} {'seconds':>8}")
    for name, rss, seconds in rows:
        print(f"{name:<24} {rss:>13,.0f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
