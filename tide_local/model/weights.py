"""The model's weights as ggml tensors over the memory-mapped GGUF, without copying.

The whole file is wrapped as one CPU backend buffer and every tensor is placed at its
offset in it: loading costs nothing but the mapping, and the OS pages weights in as
they are used. With a device, everything but the routed experts and the embedding
table is copied to it once (those two stay in the mapping: experts move slot by slot,
and only the rows of the step's tokens of the table are ever needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tide_local import ggml, architecture
from tide_local.modelfile import ModelFile


def typed(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """File bytes as what `Tensor.set` takes for the type (float arrays for F32/F16, bytes for quants)."""
    dtype = ggml.numpy_dtype(ggml_type)
    return raw.view(dtype) if dtype is not None else raw


@dataclass
class LayerWeights:
    attn_norm: ggml.Tensor
    attn_qkv: ggml.Tensor
    attn_q_norm: ggml.Tensor
    attn_k_norm: ggml.Tensor
    attn_output: ggml.Tensor
    ffn_norm: ggml.Tensor
    # dense layers
    ffn_gate: ggml.Tensor | None = None
    ffn_up: ggml.Tensor | None = None
    ffn_down: ggml.Tensor | None = None
    # MoE layers
    router: ggml.Tensor | None = None
    expert_bias: np.ndarray | None = None  # host copy: selection runs on the host
    experts: dict[str, ggml.Tensor] = field(default_factory=dict)  # gate/up/down stacks
    shared_gate: ggml.Tensor | None = None
    shared_up: ggml.Tensor | None = None
    shared_down: ggml.Tensor | None = None


class Weights:
    def __init__(self, model: ModelFile, device: ggml.Backend | None = None, progress=None):
        g = model.gguf
        cfg = model.config
        self.context = ggml.Context(max_tensors=len(g.tensors) + 8)
        self.buffer = ggml.wrap_host_memory(g._mmap)
        self.mapped: dict[str, ggml.Tensor] = {}
        for name, info in g.tensors.items():
            t = self.context.new_tensor(info.ggml_type, ne=info.ne, name=name[:63])
            self.buffer.place(t, info.offset)
            self.mapped[name] = t
        self.tensors = dict(self.mapped)
        self.device_bytes = 0
        if device is not None:
            self._copy_to(device, model, progress)
        spec_name = {(spec.layer, spec.role): spec.name for spec in model.specs}

        def get(layer: int | None, role: str) -> ggml.Tensor | None:  # None: the layer has no such tensor
            name = spec_name.get((layer, role))
            return None if name is None else self.tensors[name]

        embd = spec_name[None, "token_embd"]
        self._embd = g.tensor_data(embd).reshape(cfg.vocab_size, -1)
        self._embd_type = g.tensors[embd].ggml_type
        self._embd_n_per_row = cfg.hidden_size
        self.token_embd = get(None, "token_embd")
        self.output_norm = get(None, "output_norm")
        self.output = get(None, "output")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.n_layers):
            layer = LayerWeights(
                attn_norm=get(i, "attn_norm"),
                attn_qkv=get(i, "attn_qkv"),
                attn_q_norm=get(i, "attn_q_norm"),
                attn_k_norm=get(i, "attn_k_norm"),
                attn_output=get(i, "attn_output"),
                ffn_norm=get(i, "ffn_norm"),
                ffn_gate=get(i, "ffn_gate"),
                ffn_up=get(i, "ffn_up"),
                ffn_down=get(i, "ffn_down"),
                router=get(i, "router"),
                shared_gate=get(i, "shared_gate"),
                shared_up=get(i, "shared_up"),
                shared_down=get(i, "shared_down"),
            )
            if cfg.is_moe_layer(i):
                layer.expert_bias = np.array(g.tensor_array(spec_name[i, "expert_bias"]), dtype=np.float32)
                layer.experts = {proj: get(i, f"expert_{proj}") for proj in architecture.EXPERT_PROJECTIONS}
            self.layers.append(layer)

    def _copy_to(self, device: ggml.Backend, model: ModelFile, progress) -> None:
        stays = {spec.name for spec in model.specs if spec.read_in_part}
        names = [n for n in model.gguf.tensors if n not in stays]
        self.device_context = ggml.Context(max_tensors=len(names) + 8)
        copies = {}
        for name in names:
            src = self.mapped[name]
            copies[name] = self.device_context.new_tensor(src.dtype, ne=src.ne[: src.ndim], name=name[:63])
        self.device_buffer = device.alloc_tensors(self.device_context)
        for name, t in copies.items():
            t.set(typed(model.gguf.tensor_data(name), t.dtype))
            self.device_bytes += t.nbytes
            if progress is not None:
                progress(t.nbytes)
        self.tensors.update(copies)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Embedding rows [T, hidden] float32, dequantized on the host from the mapped table."""
        rows = self._embd[np.asarray(tokens, dtype=np.int64)]
        return ggml.dequantize_rows(np.ascontiguousarray(rows), self._embd_type, self._embd_n_per_row)
