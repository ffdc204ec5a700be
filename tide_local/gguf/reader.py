"""A bounds-checked, memory-mapped GGUF reader.

GGUF files come from the internet: every count, length, shape and offset is checked
against the file before it is used, and anything wrong raises `GGUFError` with the
file name and what is wrong. Tensor data is never copied: `tensor_data` returns views
of the mapping.

Parse memory stays proportional to the header: every count is checked against the bytes
left in the file before anything is built for it, the metadata has a bounded number of
keys, and a caller can look at the metadata (`before_tensors`) and refuse the file before
a single tensor info is parsed.
"""

from __future__ import annotations

import math

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tide_local.errors import GGUFError

_MAX_DIMS = 4
_MAX_COUNT = 1 << 24  # tensors / numeric array items
_MAX_KEYS = 1 << 16  # metadata entries: real files have tens
_MAX_STRING_ITEMS = 1 << 22  # items of a string array: a vocabulary has a few 100k
_MAX_STRING = 1 << 28  # a tokenizer.huggingface.json is tens of MB at most
# The fewest bytes one item takes in the file: a metadata entry (empty key, type, a uint8),
# a string (its length), a tensor info (empty name, n_dims, one dimension, type, offset).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_STRING_BYTES = 8
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8

_SCALARS = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("<u1"),
}

_NUMPY_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.I32: np.int32,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order, innermost first
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.ne))

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.n_rows)

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])


def _type_name(vtype) -> str:
    try:
        return GGUFValueType(vtype).name
    except ValueError:
        return f"type {vtype}"


def describe_value(value) -> str:
    """What a metadata value is, for messages: 'a string', 'an array of 3 items', 'the integer 5'."""
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)} items"
    return f"a {type(value).__name__}"


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: malformed GGUF header: {what}")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"needs {n} bytes at offset {self.pos} but the file ends at {len(self.buf)}")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, item_bytes: int, limit: int = _MAX_COUNT) -> int:
        """A count read from the file, refused before anything is built for it when it is
        implausible or when `item_bytes` per item cannot fit in the rest of the file."""
        n = self.unpack("<Q")
        if n > limit:
            self.fail(f"{what} count {n:,} is implausible (at most {limit:,})")
        if n * item_bytes > len(self.buf) - self.pos:
            self.fail(f"{what} count {n:,} at offset {self.pos - 8} cannot fit in the "
                      f"{len(self.buf) - self.pos:,} bytes left in the file")
        return n

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            self.fail(f"string of {n} bytes at offset {self.pos - 8}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"invalid UTF-8 string at offset {self.pos - n}")

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = self.unpack("<I")
            if item_type == GGUFValueType.STRING:
                n = self.count("string array item", _MIN_STRING_BYTES, _MAX_STRING_ITEMS)
                return [self.string() for _ in range(n)]
            if item_type not in _SCALARS:
                self.fail(f"unsupported array item type {item_type}")
            dtype = _SCALARS[GGUFValueType(item_type)]
            n = self.count("array item", dtype.itemsize)
            arr = np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype)
            return arr.astype(bool) if item_type == GGUFValueType.BOOL else arr.copy()
        if vtype not in _SCALARS:
            self.fail(f"unknown metadata value type {vtype}")
        dtype = _SCALARS[GGUFValueType(vtype)]
        value = np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0]
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        return float(value) if dtype.kind == "f" else int(value)


class GGUFFile:
    """An open GGUF file: `metadata` (key → value), `tensors` (name → TensorInfo).

    `before_tensors(gguf, n_tensors)`, if given, is called once the metadata is read and
    before any tensor info is: it may raise to refuse the file (a foreign architecture, a
    tensor count the caller's model does not have) while parsing has cost only the metadata.
    """

    def __init__(self, path: str | os.PathLike, *, before_tensors=None):
        self.path = Path(path)
        if not self.path.is_file():
            what = ("is a directory" if self.path.is_dir() else
                    "not a regular file" if self.path.exists() else "no such file")
            raise GGUFError(f"{self.path}: {what}")
        self.file_size = self.path.stat().st_size
        if self.file_size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file ({self.file_size} bytes)")
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(before_tensors)
        except Exception:
            self.close()
            raise

    def _parse(self, before_tensors) -> None:
        cur = _Cursor(self._mmap, self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (need 2 or 3)")
        n_tensors = cur.count("tensor", _MIN_TENSOR_INFO_BYTES)
        n_kv = cur.count("metadata", _MIN_KV_BYTES, _MAX_KEYS)
        self.metadata: dict[str, object] = {}
        # key -> (value type, array item type or None): what a faithful rewrite needs
        self.value_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            item_type = None
            if vtype == GGUFValueType.ARRAY and cur.pos + 4 <= len(self._mmap):
                item_type = struct.unpack_from("<I", self._mmap, cur.pos)[0]
            self.metadata[key] = cur.value(vtype)
            self.value_types[key] = (vtype, item_type)
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool):
            cur.fail(f"metadata key general.alignment is {describe_value(alignment)}, expected an integer")
        self.alignment = alignment
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            cur.fail(f"general.alignment {self.alignment} is not a power of two")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > len(self._mmap) - cur.pos:
            cur.fail(f"{n_tensors:,} tensor infos cannot fit in the {len(self._mmap) - cur.pos:,} bytes left")
        self.n_tensors = n_tensors
        if before_tensors is not None:
            before_tensors(self, n_tensors)
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                cur.fail(f"tensor {name} has {n_dims} dimensions")
            ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            raw.append((name, ne, ggml_type, offset))
        self.data_offset = (cur.pos + self.alignment - 1) // self.alignment * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in raw:
            self.tensors[name] = self._check_tensor(name, ne, ggml_type, offset)
        del raw
        # tensors never share bytes (llama.cpp lays them out one after another as well)
        end, last = self.data_offset, None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if t.offset < end:
                raise GGUFError(f"{self.path}: tensor {t.name} overlaps tensor {last} in the file")
            end, last = t.offset + t.nbytes, t.name

    def _check_tensor(self, name, ne, ggml_type, offset) -> TensorInfo:
        where = f"{self.path}: tensor {name}"
        if name in self.tensors:
            raise GGUFError(f"{where} appears twice")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{where} has unknown type {ggml_type}") from None
        if any(n <= 0 or n > 1 << 40 for n in ne):
            raise GGUFError(f"{where} has an invalid shape {list(ne)}")
        if ne[0] % block:
            raise GGUFError(f"{where}: row of {ne[0]} does not divide into blocks of {block}")
        if offset % self.alignment:
            raise GGUFError(f"{where}: data offset {offset} is not aligned to {self.alignment}")
        nbytes = ne[0] // block * type_size
        for n in ne[1:]:
            nbytes *= n
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            raise GGUFError(
                f"{self.path}: truncated: tensor {name} needs bytes up to {start + nbytes:,} "
                f"but the file has {self.file_size:,}"
            )
        return TensorInfo(name, ne, ggml_type, start, nbytes)

    # -- access -----------------------------------------------------------------------
    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor_array(self, name: str) -> np.ndarray:
        """An F32/F16/I32 tensor as a numpy view in numpy shape order (no copy)."""
        t = self.tensors[name]
        dtype = _NUMPY_TYPES.get(GGMLQuantizationType(t.ggml_type))
        if dtype is None:
            raise TypeError(f"{name} is {t.type_name}; dequantize it instead")
        return self.tensor_data(name).view(dtype).reshape(t.shape)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def value_type_name(self, key: str) -> str:
        """The GGUF type of a metadata value as the spec names it ("UINT32", "ARRAY of STRING")."""
        vtype, item_type = self.value_types[key]
        name = _type_name(vtype)
        return f"{name} of {_type_name(item_type)}" if vtype == GGUFValueType.ARRAY else name

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes with them
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
