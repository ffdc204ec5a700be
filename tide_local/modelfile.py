"""A validated LLaDA2 GGUF: the file, its hyperparameters, tensors and special tokens.

Everything that reads a model (`tide info`, the engine) opens it through `ModelFile`, so
a file that is not a complete LLaDA2 model is refused in one place, with one message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tide_local import architecture
from tide_local.errors import GGUFError
from tide_local.gguf import GGUFFile, TensorInfo


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one MoE layer and projection live in the file."""

    tensor: TensorInfo
    slice_bytes: int  # one expert's contiguous byte range

    def slice_offset(self, expert: int) -> int:
        return self.tensor.offset + expert * self.slice_bytes


class ModelFile:
    def __init__(self, path: str | os.PathLike):
        self.gguf = GGUFFile(path)
        try:
            self._validate()
        except Exception:
            self.gguf.close()
            raise

    def _validate(self) -> None:
        g = self.gguf
        arch = g.get("general.architecture")
        if arch != architecture.ARCH:
            raise GGUFError(
                f"{g.path}: architecture is '{arch}', not '{architecture.ARCH}' "
                "(convert a LLaDA2.0 checkpoint with `tide convert`)"
            )
        try:
            self.config = architecture.LLaDA2Config.from_gguf(g.metadata)
        except KeyError as err:
            raise GGUFError(f"{g.path}: missing metadata key {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise GGUFError(f"{g.path}: bad metadata value ({err})") from None
        problems = self.config.check()
        if problems:
            raise GGUFError(f"{g.path}: inconsistent hyperparameters: {problems[0]}")
        self.specs = architecture.tensor_specs(self.config)
        for spec in self.specs:
            info = g.tensors.get(spec.name)
            if info is None:
                raise GGUFError(f"{g.path}: tensor {spec.name} is missing")
            if info.ne != spec.ne:
                raise GGUFError(f"{g.path}: tensor {spec.name} has shape {list(info.ne)}, expected {list(spec.ne)}")
        self.special_ids = {}
        for role, key in architecture.SPECIAL_TOKEN_KEYS.items():
            value = g.get(key)
            if value is not None:
                if not 0 <= int(value) < self.config.vocab_size:
                    raise GGUFError(f"{g.path}: {key} = {value} is outside the vocabulary")
                self.special_ids[role] = int(value)
        for role in ("mask", "eos"):
            if role not in self.special_ids:
                raise GGUFError(f"{g.path}: metadata has no {architecture.SPECIAL_TOKEN_KEYS[role]}")

    # -- what the engine and `tide info` need ------------------------------------------
    @property
    def path(self):
        return self.gguf.path

    def tensor(self, name: str) -> TensorInfo:
        return self.gguf.tensors[name]

    def experts(self, layer: int, projection: str) -> ExpertLayout:
        info = self.tensor(architecture.expert_tensor_name(layer, projection))
        return ExpertLayout(info, info.nbytes // self.config.n_experts)

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
        g = self.gguf
        return {
            "block_length": int(g.get("tide.block_length", architecture.DEFAULT_BLOCK_LENGTH)),
            "steps": int(g.get("tide.steps", architecture.DEFAULT_STEPS)),
            "threshold": float(g.get("tide.threshold", architecture.DEFAULT_THRESHOLD)),
        }

    def close(self) -> None:
        self.gguf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
