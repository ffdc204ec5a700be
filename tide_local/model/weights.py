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
        self._embd = g.tensor_data("token_embd.weight").reshape(cfg.vocab_size, -1)
        self._embd_type = g.tensors["token_embd.weight"].ggml_type
        self._embd_n_per_row = cfg.hidden_size
        get = self.tensors.__getitem__
        self.token_embd = get("token_embd.weight")
        self.output_norm = get("output_norm.weight")
        self.output = get("output.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            layer = LayerWeights(
                attn_norm=get(p + "attn_norm.weight"),
                attn_qkv=get(p + "attn_qkv.weight"),
                attn_q_norm=get(p + "attn_q_norm.weight"),
                attn_k_norm=get(p + "attn_k_norm.weight"),
                attn_output=get(p + "attn_output.weight"),
                ffn_norm=get(p + "ffn_norm.weight"),
            )
            if cfg.is_moe_layer(i):
                layer.router = get(p + "ffn_gate_inp.weight")
                layer.expert_bias = np.array(g.tensor_array(p + "exp_probs_b.bias"), dtype=np.float32)
                layer.experts = {proj: get(architecture.expert_tensor_name(i, proj)) for proj in architecture.EXPERT_PROJECTIONS}
                if cfg.n_shared_experts:
                    layer.shared_gate = get(p + "ffn_gate_shexp.weight")
                    layer.shared_up = get(p + "ffn_up_shexp.weight")
                    layer.shared_down = get(p + "ffn_down_shexp.weight")
            else:
                layer.ffn_gate = get(p + "ffn_gate.weight")
                layer.ffn_up = get(p + "ffn_up.weight")
                layer.ffn_down = get(p + "ffn_down.weight")
            self.layers.append(layer)

    def _copy_to(self, device: ggml.Backend, model: ModelFile, progress) -> None:
        stays = {"token_embd.weight"} | {
            architecture.expert_tensor_name(layer, p) for layer in model.config.moe_layers for p in architecture.EXPERT_PROJECTIONS
        }
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
