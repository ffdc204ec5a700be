"""Our ctypes layer over libggml (the tensor library under llama.cpp).

The shared libraries come from the installed ``llama-cpp-python`` package (or
``$TIDE_GGML_LIB_DIR``) and are loaded on first use; a missing or mismatched library
raises :class:`tide_local.errors.GGMLLibraryError`.

Public surface:

* types and quantization: :data:`GGMLType` (= ``gguf.GGMLQuantizationType``),
  :func:`quantize_rows`, :func:`dequantize_rows`, :func:`row_size`,
  :func:`block_size`, :func:`type_size`, :func:`type_name`, :func:`is_quantized`
* graph building: :class:`Context` (creates tensors, one method per op),
  :class:`Tensor` (``.ne`` ggml order, ``.shape`` numpy order, ``.set``/``.get``),
  :class:`Graph`
* execution: :class:`Backend` (``Backend.cpu(n_threads)``, ``Backend.from_device``),
  :class:`Device`/:func:`devices`, :class:`Buffer`, :class:`BufferType`,
  :class:`GraphAllocator`, :func:`wrap_host_memory` (zero-copy host/mmap memory)
* :func:`set_log_mode` to route ggml's log output, :func:`library_info`.

Modules, one job each: ``tensor`` (tensor handles), ``context`` (tensor creation and
the op builders), ``graph``, ``device`` (devices, buffer types), ``buffers`` (buffers,
host memory wrapping), ``backend`` (backends, graph allocator, events, thread count),
``quant``, ``_lib`` (loading and C declarations), ``_log``, ``_handle`` (ownership).

The raw declared C functions are reachable as ``tide_local.ggml.lib().ggml_*``.
"""

from __future__ import annotations

from tide_local.ggml._lib import GGML_TENSOR_SIZE, TENSOR_ALIGNMENT
from tide_local.ggml._lib import load as lib
from tide_local.ggml._log import get_log_mode, set_log_mode
from tide_local.ggml.backend import Backend, Event, GraphAllocator
from tide_local.ggml.buffers import Buffer, aligned_empty, wrap_host_memory
from tide_local.ggml.context import Context
from tide_local.ggml.device import BufferType, Device, accelerator_devices, cpu_buffer_type, devices
from tide_local.ggml.graph import Graph
from tide_local.ggml.quant import (
    GGMLType,
    block_size,
    dequantize_rows,
    is_quantized,
    numpy_dtype,
    quantize_rows,
    requires_imatrix,
    row_size,
    type_name,
    type_size,
)
from tide_local.ggml.tensor import Tensor

__all__ = [
    "GGML_TENSOR_SIZE",
    "TENSOR_ALIGNMENT",
    "Backend",
    "Buffer",
    "BufferType",
    "Context",
    "Device",
    "Event",
    "GGMLType",
    "Graph",
    "GraphAllocator",
    "Tensor",
    "accelerator_devices",
    "aligned_empty",
    "block_size",
    "cpu_buffer_type",
    "dequantize_rows",
    "devices",
    "get_log_mode",
    "is_quantized",
    "lib",
    "library_info",
    "numpy_dtype",
    "quantize_rows",
    "requires_imatrix",
    "row_size",
    "set_log_mode",
    "type_name",
    "type_size",
    "wrap_host_memory",
]


def library_info() -> dict:
    """Where libggml was loaded from, its version, and the devices it registers."""
    L = lib()
    return {
        "lib_dir": str(L.lib_dir),
        "version": L.version,
        "commit": L.commit,
        "backend_plugins_loaded": L.loaded_backend_plugins,
        "devices": [
            {"name": d.name, "description": d.description, "type": d.type, "memory": d.memory()} for d in devices()
        ],
    }
