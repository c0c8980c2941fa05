"""hybridlm: hybrid Mamba-2 / Transformer language models (Nemotron-H family)."""

__version__ = "0.1.0"
