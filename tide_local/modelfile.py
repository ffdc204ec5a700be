"""A validated LLaDA2 GGUF: the file, its hyperparameters, tensors and special tokens.

Everything that reads a model (`tide info`, the engine) opens it through `ModelFile`, so
a file that is not a complete LLaDA2 model is refused in one place, with one message.
GGUF files come from the internet: before ggml sees anything, every key this package reads
has its type checked, every hyperparameter its range, the tensor count and the file size
what the hyperparameters imply (before anything is built per layer or expert), and every
tensor its name, shape and ggml type against what its op accepts (architecture.py).

Files from llama.cpp's LLaDA2 converter open too: they lack our tide.* keys (decoding defaults
are then the family's, expert slice sizes come from the tensors) and the end-of-turn id key
(`<|role_end|>` is found by its text), and align tensors to 32 bytes instead of a page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import TokenType

from tide_local import architecture
from tide_local.errors import GGUFError
from tide_local.gguf import GGUFFile, TensorInfo
from tide_local.gguf.reader import describe_value
from tide_local.units import human_bytes


# Special tokens found by their text when the file has no id key for them.
SPECIAL_BY_CONTENT = ("role_end", "bos")
_ADDED_TYPES = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED)}


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one MoE layer and projection live in the file."""

    tensor: TensorInfo
    slice_bytes: int  # one expert's contiguous byte range

    def slice_offset(self, expert: int) -> int:
        return self.tensor.offset + expert * self.slice_bytes


# Other keys this package reads, and what each must be: checked when the file is opened so
# that no reader meets a value of another type. (The `llada2.` keys: architecture._GGUF_KEYS.)
_STR, _INT, _NUMBER = "a string", "an integer", "a number"
_STR_LIST, _INT_LIST = "an array of strings", "an array of integers"
_KEY_KINDS = {
    "general.architecture": _STR,
    "general.name": _STR,
    "general.type": _STR,
    "tide.output_type": _STR,
    "tide.type_fallbacks": _STR_LIST,
    "tide.block_length": _INT,
    "tide.steps": _INT,
    "tide.threshold": _NUMBER,
    "tokenizer.huggingface.json": _STR,
    "tokenizer.chat_template": _STR,
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    "tokenizer.ggml.tokens": _STR_LIST,
    "tokenizer.ggml.token_type": _INT_LIST,
    "tokenizer.ggml.merges": _STR_LIST,
    **{key: _INT for key in architecture.SPECIAL_TOKEN_KEYS.values()},
    architecture.VALUE_LENGTH_KEY: _INT,
    architecture.SHARED_FFN_KEY: _INT,
}
# A page of the file: `tide convert` starts every expert stack on one.
PAGE_BYTES = 4096


def _is_kind(value, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _STR_LIST:  # an empty array may have been written with any item type
        return (isinstance(value, list) and all(isinstance(v, str) for v in value)) or (
            isinstance(value, np.ndarray) and value.size == 0)
    if kind == _INT_LIST:
        return isinstance(value, np.ndarray) and (value.dtype.kind in "iu" or value.size == 0) or (
            isinstance(value, list) and not value)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (kind == _NUMBER and isinstance(value, float))


class ModelFile:
    def __init__(self, path: str | os.PathLike):
        # The header is judged as soon as its metadata is read: a foreign or impossible file
        # is refused before its tensor infos cost anything.
        self.gguf = GGUFFile(path, before_tensors=self._check_header)
        try:
            self._validate()
        except Exception:
            self.gguf.close()
            raise

    def _check_header(self, g: GGUFFile, n_tensors: int) -> None:
        """Metadata types and values, and the tensor count and file size the hyperparameters
        imply, before any tensor info is parsed or anything is built per layer or expert."""
        for key, kind in _KEY_KINDS.items():
            if key in g.metadata and not _is_kind(g.metadata[key], kind):
                raise GGUFError(f"{g.path}: metadata key {key} has GGUF type {g.value_type_name(key)} "
                                f"({describe_value(g.metadata[key])}), expected {kind}")
        arch = g.get("general.architecture")
        if arch != architecture.ARCH:
            shown = arch if arch is None or len(arch) <= 40 else arch[:37] + "..."
            raise GGUFError(
                f"{g.path}: architecture is '{shown}', not '{architecture.ARCH}' "
                "(convert a LLaDA2.0 checkpoint with `tide convert`)"
            )
        try:
            self.config = architecture.LLaDA2Config.from_gguf(g.metadata)
        except KeyError as err:
            raise GGUFError(f"{g.path}: missing metadata key {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise GGUFError(f"{g.path}: metadata key {err}") from None
        problems = self.config.check(architecture.GGUF_NAMES)
        if problems:
            raise GGUFError(f"{g.path}: inconsistent hyperparameters: {problems[0]}")
        cfg = self.config
        # keys llama.cpp reads that follow from ours (absent in older files of ours): the model
        # must be the one llama.cpp would run (no shared experts: their width means nothing)
        for key, value in cfg.derived_gguf_metadata().items():
            got = g.get(key)
            if got is not None and got != value and not (key == architecture.SHARED_FFN_KEY
                                                         and cfg.n_shared_experts == 0):
                raise GGUFError(f"{g.path}: inconsistent hyperparameters: {key} is {got:,} but the other keys "
                                f"make it {value:,}")
        if n_tensors > cfg.n_tensors:
            raise GGUFError(f"{g.path}: the file has {n_tensors:,} tensors but a LLaDA2 model with its hyperparameters "
                            f"has {cfg.n_tensors:,}")
        need = cfg.min_gguf_bytes()
        if need > g.file_size:
            raise GGUFError(
                f"{g.path}: its hyperparameters ({cfg.n_layers:,} layers, {cfg.n_experts:,} experts, hidden size "
                f"{cfg.hidden_size:,}, vocabulary {cfg.vocab_size:,}) need at least {human_bytes(need)} of tensors "
                f"but the file is only {human_bytes(g.file_size)} (truncated, or hyperparameters that do not match "
                "its tensors)"
            )

    def _validate(self) -> None:
        g = self.gguf
        cfg = self.config
        self.specs = architecture.tensor_specs(cfg)
        for spec in self.specs:
            info = g.tensors.get(spec.name)
            if info is None:
                raise GGUFError(f"{g.path}: tensor {spec.name} is missing")
            if info.ne != spec.ne:
                raise GGUFError(f"{g.path}: tensor {spec.name} has shape {list(info.ne)}, expected {list(spec.ne)}")
            if info.ggml_type not in spec.allowed_types:
                raise GGUFError(f"{g.path}: tensor {spec.name} has type {info.type_name}, which the model cannot "
                                f"use there (allowed: {architecture.type_names(spec.allowed_types)})")
        self.special_ids = {}
        for role, key in architecture.SPECIAL_TOKEN_KEYS.items():
            value = g.get(key)
            if value is not None:
                if not 0 <= value < cfg.vocab_size:
                    raise GGUFError(f"{g.path}: {key} = {value} is outside the vocabulary")
                self.special_ids[role] = value
        for role in ("mask", "eos"):
            if role not in self.special_ids:
                raise GGUFError(f"{g.path}: metadata has no {architecture.SPECIAL_TOKEN_KEYS[role]}")
        for role in SPECIAL_BY_CONTENT:  # llama.cpp's converter writes no eot_token_id: <|role_end|> by content
            if role not in self.special_ids:
                found = self._added_token_id(architecture.SPECIAL_TOKENS[role])
                if found is not None:
                    self.special_ids[role] = found
        self._decoding = {
            "block_length": g.get("tide.block_length", architecture.DEFAULT_BLOCK_LENGTH),
            "steps": g.get("tide.steps", architecture.DEFAULT_STEPS),
            "threshold": float(g.get("tide.threshold", architecture.DEFAULT_THRESHOLD)),
        }
        rules = {"block_length": (1 <= self._decoding["block_length"] <= cfg.context_length,
                                  f"in 1..{cfg.context_length} (the model's context)"),
                 "steps": (1 <= self._decoding["steps"] <= architecture.MAX_DIMENSION, "a positive integer"),
                 "threshold": (0.0 < self._decoding["threshold"] <= 1.0, "in (0, 1]")}  # NaN fails too
        for name, (ok, rule) in rules.items():
            if not ok:
                raise GGUFError(f"{g.path}: metadata key tide.{name} = {self._decoding[name]!r} must be {rule}")

    def _added_token_id(self, content: str) -> int | None:
        """The id of an added token (CONTROL or USER_DEFINED: any type when the file has no
        token types) with this text among the model's rows, else None."""
        tokens = self.gguf.get("tokenizer.ggml.tokens") or []
        types = self.gguf.get("tokenizer.ggml.token_type")
        for i in range(min(len(tokens), self.config.vocab_size)):
            if tokens[i] == content and (types is None or len(types) != len(tokens) or int(types[i]) in _ADDED_TYPES):
                return i
        return None

    # -- what the engine and `tide info` need ------------------------------------------
    @property
    def path(self):
        return self.gguf.path

    @property
    def has_tide_keys(self) -> bool:
        """Whether `tide convert` wrote the file (its tide.* keys: decoding defaults, layout);
        a file from llama.cpp's converter has none and runs on the family's defaults."""
        return any(key.startswith("tide.") for key in self.gguf.metadata)

    def tensor(self, name: str) -> TensorInfo:
        return self.gguf.tensors[name]

    def experts(self, layer: int, projection: str) -> ExpertLayout:
        info = self.tensor(architecture.expert_tensor_name(layer, projection))
        return ExpertLayout(info, info.nbytes // self.config.n_experts)

    def expert_stacks_page_aligned(self) -> bool:
        """Whether every routed-expert stack starts on a page of the file (`tide convert` aligns
        tensors to 4096 bytes; llama.cpp's converter to 32). Either way slices are copied out of
        the mapping (Tensor.set) at whatever offset they have."""
        return all(self.experts(layer, proj).tensor.offset % PAGE_BYTES == 0
                   for layer in self.config.moe_layers for proj in architecture.EXPERT_PROJECTIONS)

    def expert_bytes(self) -> int:
        """All routed-expert weights (the part that is offloaded)."""
        return sum(
            self.tensor(architecture.expert_tensor_name(layer, proj)).nbytes
            for layer in self.config.moe_layers
            for proj in architecture.EXPERT_PROJECTIONS
        )

    def non_expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.gguf.tensors.values()) - self.expert_bytes()

    def one_expert_bytes(self, layer: int) -> int:
        """Gate, up and down of one routed expert of a MoE layer."""
        return sum(self.experts(layer, proj).slice_bytes for proj in architecture.EXPERT_PROJECTIONS)

    def bytes_read_per_forward(self, distinct_experts: dict[int, int]) -> int:
        """Weight bytes one forward reads: every matrix outside the expert stacks except the
        embedding table (only its rows are looked up), plus the distinct routed experts the
        forward's tokens chose in each MoE layer (`distinct_experts`: layer -> count)."""
        fixed = self.non_expert_bytes() - self.tensor(architecture.tensor_name("token_embd")).nbytes
        return fixed + sum(n * self.one_expert_bytes(layer) for layer, n in distinct_experts.items())

    def decoding_defaults(self) -> dict:
        """block_length, steps and threshold from the file (checked when it was opened)."""
        return dict(self._decoding)

    def close(self) -> None:
        self.gguf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
