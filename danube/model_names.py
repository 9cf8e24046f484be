"""Names the config layer checks against model code it must not import (megatron-core)."""

# LoRA targets: NeMo's names (NeMo-Aligner's gpt_sft.yaml) and megatron-core's module names.
LORA_TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2",
                "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
