"""GGUF files: a streaming writer and a bounds-checked memory-mapped reader."""

from tide_local.gguf.reader import GGUFFile, TensorInfo
from tide_local.gguf.writer import GGUFStreamWriter, align, tensor_nbytes

__all__ = ["GGUFFile", "TensorInfo", "GGUFStreamWriter", "align", "tensor_nbytes"]
