"""pmlm-engine: training engine for UniLMv2-style pseudo-masked language models."""

__version__ = "0.1.0"
