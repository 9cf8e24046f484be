"""Scoring and generation from a danube checkpoint (megatron-core's inference engine)."""
