"""The public engine: load a GGUF, then logits / generate / stream / chat.

    import tide_local
    eng = tide_local.load("model.gguf")
    res = eng.generate("The capital of France is", max_new_tokens=64)
    print(res.text, res.stats["tokens_per_second"])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from tide_local import ggml
from tide_local.diffusion import BlockEvent, DecodeOptions, DecodeResult, StepEvent, WindowModel, iter_decode
from tide_local.model.llada2 import LLaDA2Model
from tide_local.modelfile import ModelFile
from tide_local.tokenizer import Tokenizer

# Attention scores of one prefill chunk stay under this many bytes.
PREFILL_SCORE_BYTES = 1 << 28


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stats: dict = field(default_factory=dict)


class CachedBlockModel:
    """The decoder's view of the model: prefill, per-step block logits, block commits."""

    def __init__(self, model: LLaDA2Model, block_length: int):
        self.model = model
        self.block_length = block_length
        self.forwards = 0
        self.forwarded_tokens = 0

    def _forward(self, tokens, start, rows=None):
        self.forwards += 1
        self.forwarded_tokens += len(tokens)
        return self.model.forward(tokens, start, rows=rows)

    def prefill(self, tokens: np.ndarray) -> None:
        cfg, n = self.model.config, len(tokens)
        if n == 0:
            return
        self.model.ensure_capacity(n)
        # chunk so that one chunk's attention scores [n_kv, chunk, heads] stay bounded
        chunk = PREFILL_SCORE_BYTES // (4 * cfg.n_heads * n)
        chunk = max(self.block_length, min(512, chunk) // self.block_length * self.block_length)
        for start in range(0, n, chunk):
            self._forward(tokens[start:start + chunk], start)

    def block_logits(self, block: np.ndarray, start: int, rows: np.ndarray) -> np.ndarray:
        return self._forward(block, start, rows)

    def commit_block(self, block: np.ndarray, start: int) -> None:
        self._forward(block, start)


class Engine:
    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.file = ModelFile(path)
        self.config = self.file.config
        self.tokenizer = Tokenizer.from_gguf(self.file.gguf)
        ids = self.file.special_ids
        self.mask_id, self.eos_id = ids["mask"], ids["eos"]
        self.role_end_id = ids.get("role_end")
        self.defaults = self.file.decoding_defaults()
        self.backend = ggml.Backend.cpu(threads or os.cpu_count() or 1)
        self.model = LLaDA2Model(self.file, self.backend, self.defaults["block_length"])

    @property
    def threads(self) -> int:
        return self.backend.n_threads

    # -- inputs ------------------------------------------------------------------------------
    def _ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(i, (int, np.integer)) for i in ids):
                raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("the prompt is empty")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return arr.astype(np.int32)

    def _options(self, options: dict) -> DecodeOptions:
        merged = {"threshold": self.defaults["threshold"], "steps": self.defaults["steps"],
                  "block_length": self.defaults["block_length"]}
        merged.update({k: v for k, v in options.items() if v is not None or k in ("top_k", "top_p", "seed")})
        try:
            opts = DecodeOptions(**merged)
        except TypeError as err:
            raise TypeError(f"unknown generation option: {err}") from None
        opts.validate()
        if opts.block_length != self.model.block_length:
            raise ValueError(f"block_length must be {self.model.block_length} for this model (it was trained so)")
        return opts

    def _check_context(self, n_prompt: int, opts: DecodeOptions) -> None:
        B = opts.block_length
        needed = -(-(n_prompt + opts.max_new_tokens) // B) * B
        if needed > self.config.context_length:
            raise ValueError(
                f"a prompt of {n_prompt} tokens plus {opts.max_new_tokens} new tokens needs {needed} positions "
                f"(whole blocks of {B}); the model's context is {self.config.context_length}"
            )

    # -- the API -----------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: one full forward at positions 0..n-1, block-causal, no cache."""
        arr = self._ids(ids)
        if len(arr) > self.config.context_length:
            raise ValueError(f"{len(arr)} tokens exceed the model's context of {self.config.context_length}")
        return self.model.forward(arr, 0, rows=np.arange(len(arr)))

    def stream(self, prompt, *, kv_cache: bool = True, stop_ids: Sequence[int] | None = None,
               **options) -> Iterator[StepEvent | BlockEvent | GenerationResult]:
        """Events as decoding goes: a StepEvent per denoising step, a BlockEvent per finished
        block, and the GenerationResult last."""
        ids = self._ids(prompt)
        opts = self._options(options)
        self._check_context(len(ids), opts)
        if kv_cache:
            block_model = CachedBlockModel(self.model, opts.block_length)
        else:
            block_model = WindowModel(lambda toks, rows: self.model.forward(toks, 0, rows=rows), opts.block_length)
        stops = [self.eos_id] if stop_ids is None else list(stop_ids)
        start = time.perf_counter()
        for event in iter_decode(block_model, ids, opts, mask_id=self.mask_id, stop_ids=stops):
            if isinstance(event, DecodeResult):
                stats = dict(event.stats)
                stats["forwards"] = block_model.forwards
                stats["forwarded_tokens"] = block_model.forwarded_tokens
                stats["wall_seconds"] = time.perf_counter() - start
                stats["kv_cache"] = kv_cache
                yield GenerationResult(event.tokens, self.tokenizer.decode(event.tokens), stats)
            else:
                yield event

    def generate(self, prompt, **options) -> GenerationResult:
        """Decode `prompt` (token ids used as is, or a string used as is: no chat template)."""
        result = None
        for event in self.stream(prompt, **options):
            result = event
        return result

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def chat_stop_ids(self) -> list[int]:
        return [self.eos_id] + ([self.role_end_id] if self.role_end_id is not None else [])

    def chat(self, messages: list[dict], **options) -> GenerationResult:
        """Render `messages` with the model's chat template and answer; stops at EOS or <|role_end|>."""
        return self.generate(self.chat_prompt(messages), stop_ids=self.chat_stop_ids(), **options)

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | os.PathLike, *, threads: int | None = None) -> Engine:
    """Open a LLaDA2 GGUF (written by `tide convert`) for generation."""
    return Engine(path, threads=threads)
