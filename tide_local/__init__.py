"""tide-local: a local runner for LLaDA2.0 MoE diffusion language models on ggml."""

__version__ = "0.1.0"
