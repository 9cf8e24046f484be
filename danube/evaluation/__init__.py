"""Benchmarks (lm-evaluation-harness) on danube checkpoints and Hugging Face exports."""
