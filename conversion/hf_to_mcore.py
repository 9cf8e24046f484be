"""Hugging Face Llama/Mistral directory -> danube checkpoint + pretraining config + tokenizer.

    python conversion/hf_to_mcore.py <hf_dir> <out_dir>
    python launchers/pretrain.py --config-path <out_dir> --config-name config \
        model.data.data_prefix=[1.0,/data/my_text_document]
"""

import argparse
import sys

from danube.conversion import ConversionError
from danube.runtime import hide_cuda_for, quiet_engine_notices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="local directory of a MistralForCausalLM/LlamaForCausalLM")
    parser.add_argument("out_dir", help="new directory for the checkpoint, config and tokenizer")
    args = parser.parse_args()
    # A CPU job wherever it runs: builds on the meta device, streams HF tensors from host
    # memory, one gloo process. On a GPU host CUDA would otherwise stay visible with no CPU
    # shims, and megatron's save would hand gloo CUDA-device tensors.
    hide_cuda_for("cpu")
    quiet_engine_notices()
    from danube.conversion.importer import import_hf

    try:
        out = import_hf(args.hf_dir, args.out_dir)
    except ConversionError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {out}/checkpoint, {out}/tokenizer and {out}/config.yaml")


if __name__ == "__main__":
    main()
