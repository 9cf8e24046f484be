"""Names that both the config checks and the model code use, kept free of megatron-core so
the config layer can import them."""

# LoRA targets: NeMo's names (NeMo-Aligner's gpt_sft.yaml) and megatron-core's module names ->
# the linear's path inside a transformer layer.
LORA_TARGETS = {
    "attention_qkv": "self_attention.linear_qkv", "linear_qkv": "self_attention.linear_qkv",
    "attention_dense": "self_attention.linear_proj", "linear_proj": "self_attention.linear_proj",
    "mlp_fc1": "mlp.linear_fc1", "linear_fc1": "mlp.linear_fc1",
    "mlp_fc2": "mlp.linear_fc2", "linear_fc2": "mlp.linear_fc2",
}
# The adapter tensors a LoRA checkpoint holds beside each adapted linear's weight.
LORA_ADAPTERS = ("lora_a", "lora_b")
