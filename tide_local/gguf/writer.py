"""A streaming GGUF writer: header, metadata, tensor infos, then tensor data in order.

Tensor data is written piece by piece as it is produced, so a 200 GB model converts in
bounded memory. Output goes to a temporary file beside the target and is renamed into
place only when every tensor is complete: a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tide_local.errors import OutputPathError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if ne[0] % block:
        raise ValueError(f"row of {ne[0]} values does not divide into blocks of {block}")
    rows = 1
    for n in ne[1:]:
        rows *= n
    return ne[0] // block * type_size * rows


def align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _infer_type(value) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


@dataclass
class _PendingTensor:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section
    nbytes: int
    written: int = 0


class GGUFStreamWriter:
    """Write a GGUF file: declare metadata and tensors, then stream tensor data.

    Use as a context manager; leaving the block by an exception removes the partial file::

        with GGUFStreamWriter(path, alignment=4096) as w:
            w.add("general.architecture", "llada2")
            w.add_tensor("a.weight", (64, 32), GGMLQuantizationType.F32)
            w.begin_data()
            w.write("a.weight", data)
    """

    def __init__(self, path: str | os.PathLike, alignment: int = 32):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two")
        self.path = Path(path)
        self.alignment = alignment
        self._kv: list[tuple[str, GGUFValueType, object, GGUFValueType | None]] = []
        self._tensors: dict[str, _PendingTensor] = {}
        self._data_size = 0
        self._file = None
        self._tmp_path: Path | None = None
        self._data_start = 0
        self._order: list[str] = []
        self._next = 0
        if alignment != 32:
            self.add("general.alignment", alignment, GGUFValueType.UINT32)

    # -- declaring ------------------------------------------------------------------
    def add(self, key: str, value, vtype: GGUFValueType | None = None, item_type: GGUFValueType | None = None):
        vtype = vtype if vtype is not None else _infer_type(value)
        if vtype == GGUFValueType.ARRAY and item_type is None:
            items = list(value)
            item_type = _infer_type(items[0]) if items else GGUFValueType.UINT32
            if item_type == GGUFValueType.UINT32 and any(not 0 <= int(v) < 2**32 for v in items):
                item_type = GGUFValueType.INT64
        self._kv.append((key, vtype, value, item_type))

    def add_tensor(self, name: str, ne: tuple[int, ...], ggml_type: int) -> int:
        """Declare a tensor (ggml `ne` order); returns its offset in the data section."""
        if self._file is not None:
            raise RuntimeError("tensors must be declared before begin_data()")
        if name in self._tensors:
            raise ValueError(f"duplicate tensor {name}")
        offset = align(self._data_size, self.alignment)
        nbytes = tensor_nbytes(ne, ggml_type)
        self._tensors[name] = _PendingTensor(name, tuple(ne), int(ggml_type), offset, nbytes)
        self._order.append(name)
        self._data_size = offset + nbytes
        return offset

    def header_size(self) -> int:
        return len(self._header_bytes())

    def total_size(self) -> int:
        """Size of the finished file in bytes."""
        return align(self.header_size(), self.alignment) + self._data_size

    # -- writing --------------------------------------------------------------------
    def begin_data(self) -> None:
        """Create the temporary file and write everything before the tensor data."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise OutputPathError(f"output directory {directory} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".partial")
        except OSError as err:
            raise OutputPathError(f"cannot write to {directory}: {err.strerror}") from None
        self._tmp_path = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        header = self._header_bytes()
        self._data_start = align(len(header), self.alignment)
        self._file.write(header)
        self._file.write(b"\0" * (self._data_start - len(header)))

    def write(self, name: str, data) -> None:
        """Append bytes of tensor `name`; tensors must come in declaration order."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"tensor data out of order: got {name}, expected {expected}")
        tensor = self._tensors[name]
        view = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if tensor.written + view.nbytes > tensor.nbytes:
            raise RuntimeError(f"too much data for {name}")
        if tensor.written == 0:
            self._pad_to(self._data_start + tensor.offset)
        self._file.write(view)
        tensor.written += view.nbytes
        if tensor.written == tensor.nbytes:
            self._next += 1

    def finish(self) -> Path:
        """Check every tensor is complete, flush, and move the file into place."""
        missing = [t.name for t in self._tensors.values() if t.written != t.nbytes]
        if missing:
            raise RuntimeError(f"tensor data incomplete: {missing[0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.chmod(self._tmp_path, 0o644)
        os.replace(self._tmp_path, self.path)
        self._tmp_path = None
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self._tmp_path is not None:
            self.abort()
        return False

    # -- encoding -------------------------------------------------------------------
    def _pad_to(self, position: int) -> None:
        here = self._file.tell()
        if position > here:
            self._file.write(b"\0" * (position - here))

    def _header_bytes(self) -> bytes:
        out = bytearray(GGUF_MAGIC)
        out += struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))
        for key, vtype, value, item_type in self._kv:
            out += _string(key)
            out += struct.pack("<I", vtype)
            out += _value(vtype, value, item_type)
        for name in self._order:
            t = self._tensors[name]
            out += _string(name)
            out += struct.pack("<I", len(t.ne))
            out += struct.pack(f"<{len(t.ne)}Q", *t.ne)
            out += struct.pack("<IQ", t.ggml_type, t.offset)
        return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: GGUFValueType, value, item_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        items = list(value)
        head = struct.pack("<IQ", item_type, len(items))
        if item_type == GGUFValueType.STRING:
            return head + b"".join(_string(s) for s in items)
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[item_type]
            return head + np.asarray(items, dtype=np.dtype(fmt[1:]).newbyteorder("<")).tobytes()
        raise TypeError("nested arrays are not supported")
    return struct.pack(_SCALAR_FORMATS[vtype], value)
