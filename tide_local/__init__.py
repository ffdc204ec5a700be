"""tide-local: a local runner for LLaDA2.0 MoE diffusion language models on ggml.

    import tide_local
    with tide_local.load("model.gguf", gpu_memory="6GiB") as eng:
        res = eng.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=128)
        print(res.text, res.stats.tokens_per_second, res.stats.finish_reason)

The public names below are imported on first use, so that `import tide_local` (and the
`tide` commands that never run a model) do not load libggml.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load": "tide_local.engine",
    "Engine": "tide_local.engine",
    "GenerationResult": "tide_local.results",
    "GenerationStats": "tide_local.results",
    "OffloadStats": "tide_local.results",
    "LayerOffload": "tide_local.results",
    "DecodeOptions": "tide_local.diffusion",
    "StepEvent": "tide_local.diffusion",
    "BlockEvent": "tide_local.diffusion",
    "TideError": "tide_local.errors",
    "ContextError": "tide_local.errors",
    "BudgetError": "tide_local.errors",
    "DeviceError": "tide_local.errors",
    "GGUFError": "tide_local.errors",
    "ChatTemplateError": "tide_local.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'tide_local' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
