"""Logits of a danube checkpoint under a given tensor-parallel size (run with torchrun).

    torchrun --nproc_per_node N tests/helpers/checkpoint_logits.py CKPT TP OUT.pt

Builds the checkpoint's model at TP=N (fp32, local spec), loads it (dist_checkpointing
reshards), runs a fixed batch and gathers the vocab-parallel logits; rank 0 saves them.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from megatron.core import tensor_parallel

    from danube.config.compose import load_yaml_config
    from danube.data.tokenizer import load_tokenizer
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.paths import TOKENIZER_DIR
    from danube.training.checkpoint import load_checkpoint
    from danube.training.distributed import init_distributed, shutdown

    ckpt, tp, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    m = replace(load_yaml_config(ckpt / "config.yaml").model, tensor_model_parallel_size=tp)
    init_distributed(m, "cpu")
    try:
        vocab = load_tokenizer(ckpt / TOKENIZER_DIR).vocab_size
        model = build_model_chunks(m, transformer_config(m, "32", False), vocab, False)[0]
        load_checkpoint(ckpt, [model])
        tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = model.eval()(tokens, positions, None)  # [b, s, padded vocab / TP]
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, out)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
