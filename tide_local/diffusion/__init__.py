"""Block-diffusion decoding for LLaDA2.0 (pure numpy, independent of how logits are computed).

:func:`iter_decode` / :func:`decode` drive a :class:`BlockModel` (a model with a cache of finished
blocks); :class:`WindowModel` adapts a cache-free whole-window logits function to it.
"""

from .blockmodel import BlockModel, PassInfo, WindowModel
from .decoder import BlockEvent, DecodeResult, DecodeStats, FinishReason, StepEvent, decode, iter_decode
from .options import DecodeOptions, OptionValueError, option_specs
from .sampling import transfer_schedule

__all__ = [
    "BlockModel",
    "WindowModel",
    "PassInfo",
    "DecodeOptions",
    "StepEvent",
    "BlockEvent",
    "DecodeResult",
    "DecodeStats",
    "FinishReason",
    "OptionValueError",
    "option_specs",
    "decode",
    "iter_decode",
    "transfer_schedule",
]
