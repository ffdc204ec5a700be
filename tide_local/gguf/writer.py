"""A streaming GGUF writer: header, metadata, tensor infos, then tensor data in order.

Tensor data is written piece by piece as it is produced, so a 200 GB model converts in
bounded memory. Output goes to a temporary file beside the target and is renamed into
place only when every tensor is complete: a failed or interrupted run leaves nothing.

While the temporary file exists, the signals that would end the process unhandled (SIGTERM,
SIGHUP, SIGQUIT, SIGUSR1/2, SIGALRM, ...; SIGINT is Python's KeyboardInterrupt already) raise
:class:`SignalInterrupt` in the main thread instead, so the `with` block removes the file like
after Ctrl-C. The temporary file is locked (flock) while it is written: after a SIGKILL the
lock is gone with the process, and :func:`remove_stale_partials` removes such leftovers
without touching the file of a conversion still running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from tide_local.errors import OutputPathError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3

PARTIAL_SUFFIX = ".partial"
# ".{output name}.{mkstemp's 8 random characters}.partial"
_PARTIAL_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX) + "$")

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no stale-file detection
    fcntl = None


# -- signals ------------------------------------------------------------------------------------

class SignalInterrupt(KeyboardInterrupt):
    """A terminating signal (SIGTERM, SIGHUP, ...) turned into an exception so that cleanup runs;
    ``signum`` says which (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _terminating_signals() -> list[int]:
    names = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGVTALRM", "SIGPROF")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved: dict[int, object] = {}
_guard_fired = False


def _raise_interrupt(signum, frame):
    global _guard_fired
    if _guard_fired:  # already cleaning up after the first one: let the cleanup finish
        return
    _guard_fired = True
    raise SignalInterrupt(signum)


def _ignore(signum, frame):
    pass


@contextlib.contextmanager
def interrupt_on_signals():
    """Within the block, terminating signals whose action is the default (kill the process)
    raise :class:`SignalInterrupt` in the main thread, so `with`/`finally` cleanup runs; a
    second signal during that cleanup is ignored. SIGXFSZ is ignored, so a write beyond the
    file size limit fails with EFBIG (an OSError) instead of killing the process. Handlers a
    program set itself, and ignored signals (nohup), are left alone. Reentrant; does nothing
    outside the main thread."""
    global _guard_depth, _guard_fired
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _guard_lock:
        _guard_depth += 1
        if _guard_depth == 1:
            _guard_fired = False
            for signum in _terminating_signals():
                if signal.getsignal(signum) == signal.SIG_DFL:
                    _guard_saved[signum] = signal.signal(signum, _raise_interrupt)
            if hasattr(signal, "SIGXFSZ") and signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
                _guard_saved[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, _ignore)
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                for signum, handler in _guard_saved.items():
                    signal.signal(signum, handler)
                _guard_saved.clear()


@contextlib.contextmanager
def _signals_deferred():
    """Hold back the signals `interrupt_on_signals` raises on, so that a few statements run as
    one step (a file created and its name recorded); they are delivered after the block."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [*_terminating_signals(), signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- output paths and leftovers ---------------------------------------------------------------

def resolve_output(path: str | os.PathLike) -> Path:
    """The file that writing to `path` replaces: `path`, or the file a symlink at `path`
    points to (so the link stays and its target is replaced)."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output that is not a regular file, a symlink to one, or a new name in a
    writable directory; returns the file that will be replaced (see `resolve_output`)."""
    path = Path(path)
    target = resolve_output(path)
    via = f" (the target of the symlink {path})" if target != path else ""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise OutputPathError(f"{path}: cannot use as output{via} ({err.strerror})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{path}: is a directory{via}; give a file name such as {path / 'model.gguf'}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{target}{via}: exists and is not a regular file (a device, pipe or socket); "
                              "give another output file")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise OutputPathError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: directory {directory} is not writable")
    return target


def _lock(fd: int, block: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def remove_stale_partials(directory: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove the temporary files of GGUF writes in `directory` that no process writes any
    more (a run killed by SIGKILL, a crash); returns (path, size) of each removed. A file is
    stale when nobody holds its lock; files that are not ours (name or contents) are left."""
    if fcntl is None:
        return []
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if not _PARTIAL_NAME.match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            head = os.pread(fd, 4, 0)
            if head and head != GGUF_MAGIC[: len(head)]:
                continue
            if not _lock(fd, block=False):
                continue  # a write in progress
            size = os.fstat(fd).st_size
            os.unlink(entry.path)
            removed.append((Path(entry.path), size))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


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
        self._target = self.path
        self._signals = None
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
        """Create the temporary file and write everything before the tensor data.

        From here until `finish` or `abort`, terminating signals raise SignalInterrupt (see
        `interrupt_on_signals`), so leaving the `with` block removes the temporary file."""
        target = check_output_path(self.path)  # through a symlink: its target is replaced, the link stays
        self._target = target
        directory = target.parent if str(target.parent) else Path(".")
        self._signals = interrupt_on_signals()
        self._signals.__enter__()
        try:
            while True:
                with _signals_deferred():
                    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
                    self._tmp_path = Path(tmp)
                    self._file = os.fdopen(fd, "wb")
                _lock(fd, block=True)
                if os.fstat(fd).st_nlink > 0:
                    break
                # another run's stale-file cleanup took it between its creation and our lock
                self._file.close()
                self._file, self._tmp_path = None, None
            header = self._header_bytes()
            self._data_start = align(len(header), self.alignment)
            self._write(header)
            self._write(b"\0" * (self._data_start - len(header)))
        except OSError as err:
            self.abort()
            raise OutputPathError(f"cannot write to {directory}: {err.strerror}") from None
        except BaseException:
            self.abort()
            raise

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
        self._write(view)
        tensor.written += view.nbytes
        if tensor.written == tensor.nbytes:
            self._next += 1

    def finish(self) -> Path:
        """Check every tensor is complete, flush, and move the file into place."""
        missing = [t.name for t in self._tensors.values() if t.written != t.nbytes]
        if missing:
            raise RuntimeError(f"tensor data incomplete: {missing[0]}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.chmod(self._tmp_path, 0o644)
            with _signals_deferred():
                os.replace(self._tmp_path, self._target)
                self._tmp_path = None
            self._file.close()  # after the rename: the lock is held until the name is gone
            self._file = None
        except OSError as err:
            raise self._write_failed(err) from None
        self._restore_signals()
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (if any); safe to call more than once."""
        try:
            if self._tmp_path is not None:
                self._tmp_path.unlink(missing_ok=True)
                self._tmp_path = None
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:  # a full disk again while flushing the buffer: the file is gone anyway
                    pass
                self._file = None
        finally:
            self._restore_signals()

    def _restore_signals(self) -> None:
        guard, self._signals = self._signals, None
        if guard is not None:
            guard.__exit__(None, None, None)

    def _write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as err:
            raise self._write_failed(err) from None

    def _write_failed(self, err: OSError) -> OutputPathError:
        """Remove the temporary file and say why in one line (a full disk, a quota, ...)."""
        try:
            done = self._file.tell() if self._file is not None and not self._file.closed else 0
        except (OSError, ValueError):
            done = 0
        self.abort()
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file is larger than this system allows"}.get(err.errno, err.strerror or str(err))
        at = f" after {done} of {self.total_size()} bytes" if done else ""
        return OutputPathError(f"cannot write {self.path}: {why}{at}; the partial file was removed")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self._tmp_path is not None or self._signals is not None:
            self.abort()
        return False

    # -- encoding -------------------------------------------------------------------
    def _pad_to(self, position: int) -> None:
        here = self._file.tell()
        if position > here:
            self._write(b"\0" * (position - here))

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
