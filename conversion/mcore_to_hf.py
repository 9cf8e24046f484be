"""A danube checkpoint (any TP/PP layout) -> Hugging Face directory (safetensors shards).

    python conversion/mcore_to_hf.py results/danube_tiny/checkpoints/step_00000300 hf/danube_tiny
    python conversion/mcore_to_hf.py <LoRA run checkpoint> hf/adapter --adapter-only
    python conversion/mcore_to_hf.py <LoRA run checkpoint> hf/base --base-only

A LoRA run's checkpoint exports as the merged model by default; --adapter-only writes its
adapters as a PEFT adapter directory (`PeftModel.from_pretrained(base, dir)`), --base-only the
base weights it adapts.
"""

import argparse
import sys

from danube.conversion import ConversionError
from danube.runtime import quiet_engine_notices

_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def shard_bytes(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="a step_* directory written by training/import")
    parser.add_argument("hf_dir", help="new output directory")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the checkpoint's own tokenizer/)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--adapter-only", action="store_true",
                      help="a LoRA run's adapters as a PEFT adapter directory")
    only.add_argument("--base-only", action="store_true",
                      help="a LoRA run's base weights, without its adapters merged")
    args = parser.parse_args()
    quiet_engine_notices()
    from danube.conversion.exporter import export_adapter, export_hf

    try:
        if args.adapter_only:
            out = export_adapter(args.checkpoint_dir, args.hf_dir)
        else:
            out = export_hf(args.checkpoint_dir, args.hf_dir, shard_bytes(args.max_shard_size),
                            args.tokenizer, merge=not args.base_only)
    except ConversionError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
