"""danube: configuration-driven pretraining of H2O-Danube-style LLMs on megatron-core."""

__version__ = "0.1.0"
