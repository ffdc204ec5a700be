"""tide-local: a local runner for LLaDA2.0 MoE diffusion language models on ggml."""

__version__ = "0.1.0"


def load(path, **options):
    """Open a LLaDA2 GGUF for generation (see tide_local.engine.Engine)."""
    from tide_local.engine import load as _load

    return _load(path, **options)
