"""Loading libggml and declaring the C API we use.

The declarations mirror the ggml headers shipped with llama-cpp-python 0.3.36
(``vendor/llama.cpp/ggml/include/{ggml,ggml-backend,ggml-alloc,ggml-cpu}.h``).
Struct layouts must match that exact version: :func:`load` checks
``ggml_tensor_overhead()`` against our ``ggml_tensor`` declaration and a few enum
values before anything else runs.

Where the libraries come from:

* ``$TIDE_GGML_LIB_DIR`` if set (another build of the same ggml version, e.g. one
  with CUDA), else
* ``<site-packages>/llama_cpp/lib`` of the installed llama-cpp-python.

They are loaded once, lazily, with ``RTLD_GLOBAL`` in dependency order
(``libggml-base`` → ``libggml-cpu`` → ``libggml``). In the default llama-cpp-python
build the backends are linked into ``libggml`` (it has ``DT_NEEDED`` entries for
``libggml-cpu.so`` and, in an accelerator build, ``libggml-cuda.so`` etc.), so loading
``libggml`` registers them all. A build with ``GGML_BACKEND_DL=ON`` instead ships
backend plugins (``libggml-cpu-<variant>.so``, ``libggml-cuda.so``, ...) that
``ggml_backend_load_all_from_path`` discovers; we call it when no CPU device is
registered after loading ``libggml``.

Pointers to opaque objects (contexts, tensors, graphs, backends, buffers, ...) are
declared as ``c_void_p`` so they travel as plain Python ints: this keeps the
per-call cost of the graph-building path low.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_void_p,
)
from pathlib import Path

from tide_local.errors import GGMLLibraryError

GGML_VERSION_PIN = "llama-cpp-python==0.3.36"
ENV_LIB_DIR = "TIDE_GGML_LIB_DIR"

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_DEFAULT_GRAPH_SIZE = 2048
TENSOR_ALIGNMENT = 32  # ggml-impl.h: required alignment of ggml_backend_cpu_buffer_from_ptr

GGML_ROPE_TYPE_NORMAL = 0
GGML_ROPE_TYPE_NEOX = 2

GGML_PREC_DEFAULT = 0
GGML_PREC_F32 = 10

GGML_STATUS_ALLOC_FAILED = -2
GGML_STATUS_FAILED = -1
GGML_STATUS_SUCCESS = 0
GGML_STATUS_ABORTED = 1

# enum ggml_backend_dev_type
DEV_TYPE_CPU = 0
DEV_TYPE_GPU = 1
DEV_TYPE_IGPU = 2
DEV_TYPE_ACCEL = 3
DEV_TYPE_META = 4
DEV_TYPE_NAMES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

# enum ggml_backend_buffer_usage
BUFFER_USAGE_ANY = 0
BUFFER_USAGE_WEIGHTS = 1
BUFFER_USAGE_COMPUTE = 2

# enum ggml_log_level
LOG_NONE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CONT = range(6)


# --------------------------------------------------------------------------- structs


class ggml_init_params(Structure):
    _fields_ = [
        ("mem_size", c_size_t),
        ("mem_buffer", c_void_p),
        ("no_alloc", c_bool),
    ]


class ggml_tensor(Structure):
    pass


ggml_tensor._fields_ = [
    ("type", c_int),  # enum ggml_type
    ("buffer", c_void_p),  # struct ggml_backend_buffer *
    ("ne", c_int64 * GGML_MAX_DIMS),
    ("nb", c_size_t * GGML_MAX_DIMS),
    ("op", c_int),  # enum ggml_op
    ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", c_int32),
    ("src", POINTER(ggml_tensor) * GGML_MAX_SRC),
    ("view_src", POINTER(ggml_tensor)),
    ("view_offs", c_size_t),
    ("data", c_void_p),
    ("name", c_char * GGML_MAX_NAME),
    ("extra", c_void_p),
    ("padding", c_char * 8),
]

# struct ggml_object (ggml.c): size_t offs, size; ggml_object *next; enum type; char padding[4]
GGML_OBJECT_SIZE = 32
GGML_TENSOR_SIZE = ctypes.sizeof(ggml_tensor)


class ggml_backend_dev_caps(Structure):
    _fields_ = [
        ("async_", c_bool),
        ("host_buffer", c_bool),
        ("buffer_from_host_ptr", c_bool),
        ("events", c_bool),
        ("mmap_support", c_bool),
    ]


class ggml_backend_dev_props(Structure):
    _fields_ = [
        ("name", c_char_p),
        ("description", c_char_p),
        ("memory_free", c_size_t),
        ("memory_total", c_size_t),
        ("type", c_int),
        ("device_id", c_char_p),
        ("caps", ggml_backend_dev_caps),
    ]


class ggml_type_traits(Structure):
    _fields_ = [
        ("type_name", c_char_p),
        ("blck_size", c_int64),
        ("blck_size_interleave", c_int64),
        ("type_size", c_size_t),
        ("is_quantized", c_bool),
        ("to_float", c_void_p),  # ggml_to_float_t
        ("from_float_ref", c_void_p),  # ggml_from_float_t
    ]


# typedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k);
ggml_to_float_t = CFUNCTYPE(None, c_void_p, c_void_p, c_int64)
# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
ggml_log_callback = CFUNCTYPE(None, c_int, c_char_p, c_void_p)
# typedef void (*ggml_backend_set_n_threads_t)(ggml_backend_t backend, int n_threads);
ggml_backend_set_n_threads_t = CFUNCTYPE(None, c_void_p, c_int)

# --------------------------------------------------------------------------- signatures

P = c_void_p  # any opaque pointer (ctx, tensor, graph, backend, buffer, buft, dev, reg, ...)
F = c_float
I64 = c_int64

# name: (restype, argtypes). Every entry here must exist in the library.
_REQUIRED: dict[str, tuple] = {
    # misc / types
    "ggml_status_to_string": (c_char_p, [c_int]),
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_graph_overhead": (c_size_t, []),
    "ggml_graph_overhead_custom": (c_size_t, [c_size_t, c_bool]),
    "ggml_blck_size": (c_int64, [c_int]),
    "ggml_type_size": (c_size_t, [c_int]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_type_name": (c_char_p, [c_int]),
    "ggml_op_name": (c_char_p, [c_int]),
    "ggml_op_desc": (c_char_p, [P]),
    "ggml_is_quantized": (c_bool, [c_int]),
    "ggml_get_type_traits": (POINTER(ggml_type_traits), [c_int]),
    "ggml_validate_row_data": (c_bool, [c_int, c_void_p, c_size_t]),
    "ggml_log_set": (None, [ggml_log_callback, c_void_p]),
    # quantization
    "ggml_quantize_init": (None, [c_int]),
    "ggml_quantize_free": (None, []),
    "ggml_quantize_requires_imatrix": (c_bool, [c_int]),
    "ggml_quantize_chunk": (c_size_t, [c_int, c_void_p, c_void_p, I64, I64, I64, c_void_p]),
    # context
    "ggml_init": (P, [ggml_init_params]),
    "ggml_free": (None, [P]),
    "ggml_reset": (None, [P]),
    "ggml_used_mem": (c_size_t, [P]),
    "ggml_get_mem_size": (c_size_t, [P]),
    "ggml_get_no_alloc": (c_bool, [P]),
    # tensors
    "ggml_new_tensor": (P, [P, c_int, c_int, POINTER(c_int64)]),
    "ggml_new_tensor_1d": (P, [P, c_int, I64]),
    "ggml_new_tensor_2d": (P, [P, c_int, I64, I64]),
    "ggml_new_tensor_3d": (P, [P, c_int, I64, I64, I64]),
    "ggml_new_tensor_4d": (P, [P, c_int, I64, I64, I64, I64]),
    "ggml_dup_tensor": (P, [P, P]),
    "ggml_view_tensor": (P, [P, P]),
    "ggml_get_first_tensor": (P, [P]),
    "ggml_get_next_tensor": (P, [P, P]),
    "ggml_get_tensor": (P, [P, c_char_p]),
    "ggml_set_name": (P, [P, c_char_p]),
    "ggml_get_name": (c_char_p, [P]),
    "ggml_set_input": (None, [P]),
    "ggml_set_output": (None, [P]),
    "ggml_nelements": (c_int64, [P]),
    "ggml_nrows": (c_int64, [P]),
    "ggml_nbytes": (c_size_t, [P]),
    "ggml_element_size": (c_size_t, [P]),
    "ggml_n_dims": (c_int, [P]),
    "ggml_is_contiguous": (c_bool, [P]),
    "ggml_is_contiguous_1": (c_bool, [P]),
    "ggml_is_contiguous_rows": (c_bool, [P]),
    "ggml_is_transposed": (c_bool, [P]),
    "ggml_is_permuted": (c_bool, [P]),
    # ops
    "ggml_dup": (P, [P, P]),
    "ggml_add": (P, [P, P, P]),
    "ggml_add_inplace": (P, [P, P, P]),
    "ggml_sub": (P, [P, P, P]),
    "ggml_mul": (P, [P, P, P]),
    "ggml_scale": (P, [P, P, F]),
    "ggml_scale_bias": (P, [P, P, F, F]),
    "ggml_silu": (P, [P, P]),
    "ggml_sigmoid": (P, [P, P]),
    "ggml_swiglu_split": (P, [P, P, P]),
    "ggml_sum_rows": (P, [P, P]),
    "ggml_argmax": (P, [P, P]),
    "ggml_top_k": (P, [P, P, c_int]),
    "ggml_concat": (P, [P, P, P, c_int]),
    "ggml_rms_norm": (P, [P, P, F]),
    "ggml_mul_mat": (P, [P, P, P]),
    "ggml_mul_mat_id": (P, [P, P, P, P]),
    "ggml_cpy": (P, [P, P, P]),
    "ggml_cast": (P, [P, P, c_int]),
    "ggml_cont": (P, [P, P]),
    "ggml_reshape_1d": (P, [P, P, I64]),
    "ggml_reshape_2d": (P, [P, P, I64, I64]),
    "ggml_reshape_3d": (P, [P, P, I64, I64, I64]),
    "ggml_reshape_4d": (P, [P, P, I64, I64, I64, I64]),
    "ggml_view_1d": (P, [P, P, I64, c_size_t]),
    "ggml_view_2d": (P, [P, P, I64, I64, c_size_t, c_size_t]),
    "ggml_view_3d": (P, [P, P, I64, I64, I64, c_size_t, c_size_t, c_size_t]),
    "ggml_view_4d": (P, [P, P, I64, I64, I64, I64, c_size_t, c_size_t, c_size_t, c_size_t]),
    "ggml_permute": (P, [P, P, c_int, c_int, c_int, c_int]),
    "ggml_transpose": (P, [P, P]),
    "ggml_get_rows": (P, [P, P, P]),
    "ggml_set_rows": (P, [P, P, P, P]),
    "ggml_soft_max_ext": (P, [P, P, P, F, F]),
    "ggml_rope_ext": (P, [P, P, P, P, c_int, c_int, c_int, F, F, F, F, F, F]),
    "ggml_flash_attn_ext": (P, [P, P, P, P, P, F, F, F]),
    "ggml_flash_attn_ext_set_prec": (None, [P, c_int]),
    "ggml_flash_attn_ext_get_prec": (c_int, [P]),
    # graphs
    "ggml_new_graph_custom": (P, [P, c_size_t, c_bool]),
    "ggml_build_forward_expand": (None, [P, P]),
    "ggml_graph_n_nodes": (c_int, [P]),
    "ggml_graph_node": (P, [P, c_int]),
    "ggml_graph_size": (c_int, [P]),
    "ggml_graph_get_tensor": (P, [P, c_char_p]),
    # backend: buffer types
    "ggml_backend_buft_name": (c_char_p, [P]),
    "ggml_backend_buft_get_alignment": (c_size_t, [P]),
    "ggml_backend_buft_get_max_size": (c_size_t, [P]),
    "ggml_backend_buft_is_host": (c_bool, [P]),
    "ggml_backend_buft_get_device": (P, [P]),
    # backend: buffers
    "ggml_backend_buffer_name": (c_char_p, [P]),
    "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_buffer_get_base": (c_void_p, [P]),
    "ggml_backend_buffer_get_size": (c_size_t, [P]),
    "ggml_backend_buffer_get_alignment": (c_size_t, [P]),
    "ggml_backend_buffer_get_alloc_size": (c_size_t, [P, P]),
    "ggml_backend_buffer_clear": (None, [P, c_uint8]),
    "ggml_backend_buffer_is_host": (c_bool, [P]),
    "ggml_backend_buffer_set_usage": (None, [P, c_int]),
    "ggml_backend_buffer_get_usage": (c_int, [P]),
    "ggml_backend_buffer_get_type": (P, [P]),
    # backend: streams
    "ggml_backend_name": (c_char_p, [P]),
    "ggml_backend_free": (None, [P]),
    "ggml_backend_get_default_buffer_type": (P, [P]),
    "ggml_backend_alloc_buffer": (P, [P, c_size_t]),
    "ggml_backend_get_alignment": (c_size_t, [P]),
    "ggml_backend_tensor_set_async": (None, [P, P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get_async": (None, [P, P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_set": (None, [P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": (None, [P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_memset": (None, [P, c_uint8, c_size_t, c_size_t]),
    "ggml_backend_synchronize": (None, [P]),
    "ggml_backend_graph_compute": (c_int, [P, P]),
    "ggml_backend_supports_op": (c_bool, [P, P]),
    "ggml_backend_supports_buft": (c_bool, [P, P]),
    "ggml_backend_get_device": (P, [P]),
    # backend: events
    "ggml_backend_event_new": (P, [P]),
    "ggml_backend_event_free": (None, [P]),
    "ggml_backend_event_record": (None, [P, P]),
    "ggml_backend_event_synchronize": (None, [P]),
    "ggml_backend_event_wait": (None, [P, P]),
    # backend: devices
    "ggml_backend_dev_name": (c_char_p, [P]),
    "ggml_backend_dev_description": (c_char_p, [P]),
    "ggml_backend_dev_memory": (None, [P, POINTER(c_size_t), POINTER(c_size_t)]),
    "ggml_backend_dev_type": (c_int, [P]),
    "ggml_backend_dev_get_props": (None, [P, POINTER(ggml_backend_dev_props)]),
    "ggml_backend_dev_backend_reg": (P, [P]),
    "ggml_backend_dev_init": (P, [P, c_char_p]),
    "ggml_backend_dev_buffer_type": (P, [P]),
    "ggml_backend_dev_host_buffer_type": (P, [P]),
    "ggml_backend_dev_buffer_from_host_ptr": (P, [P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_dev_supports_op": (c_bool, [P, P]),
    "ggml_backend_dev_supports_buft": (c_bool, [P, P]),
    # backend: registry
    "ggml_backend_reg_name": (c_char_p, [P]),
    "ggml_backend_reg_dev_count": (c_size_t, [P]),
    "ggml_backend_reg_dev_get": (P, [P, c_size_t]),
    "ggml_backend_reg_get_proc_address": (c_void_p, [P, c_char_p]),
    "ggml_backend_reg_count": (c_size_t, []),
    "ggml_backend_reg_get": (P, [c_size_t]),
    "ggml_backend_reg_by_name": (P, [c_char_p]),
    "ggml_backend_dev_count": (c_size_t, []),
    "ggml_backend_dev_get": (P, [c_size_t]),
    "ggml_backend_dev_by_name": (P, [c_char_p]),
    "ggml_backend_dev_by_type": (P, [c_int]),
    "ggml_backend_init_by_name": (P, [c_char_p, c_char_p]),
    "ggml_backend_init_by_type": (P, [c_int, c_char_p]),
    "ggml_backend_init_best": (P, []),
    "ggml_backend_load": (P, [c_char_p]),
    "ggml_backend_load_all_from_path": (None, [c_char_p]),
    # backend: utils
    "ggml_backend_tensor_alloc": (c_int, [P, P, c_void_p]),
    "ggml_backend_view_init": (c_int, [P]),
    "ggml_backend_cpu_buffer_from_ptr": (P, [c_void_p, c_size_t]),
    "ggml_backend_cpu_buffer_type": (P, []),
    # ggml-alloc
    "ggml_gallocr_new": (P, [P]),
    "ggml_gallocr_free": (None, [P]),
    "ggml_gallocr_reserve": (c_bool, [P, P]),
    "ggml_gallocr_alloc_graph": (c_bool, [P, P]),
    "ggml_gallocr_get_buffer_size": (c_size_t, [P, c_int]),
    "ggml_backend_alloc_ctx_tensors_from_buft_size": (c_size_t, [P, P]),
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, [P, P]),
    "ggml_backend_alloc_ctx_tensors": (P, [P, P]),
}

# Present in the default build (CPU backend linked into libggml), absent from a
# GGML_BACKEND_DL build where the CPU backend is a plugin; the Python layer falls
# back to the backend registry (``ggml_backend_reg_get_proc_address``) then.
_OPTIONAL: dict[str, tuple] = {
    "ggml_version": (c_char_p, []),
    "ggml_commit": (c_char_p, []),
    "ggml_prec_set_acc": (c_bool, [P, c_int]),
    "ggml_backend_cpu_init": (P, []),
    "ggml_backend_is_cpu": (c_bool, [P]),
    "ggml_backend_cpu_set_n_threads": (None, [P, c_int]),
    "ggml_backend_cpu_reg": (P, []),
}

# Enum values our Python code relies on, checked against the library's own names.
_TYPE_NAME_CHECKS = {0: "f32", 1: "f16", 8: "q8_0", 12: "q4_K", 26: "i32", 30: "bf16", 41: "q1_0"}


# Addresses of ggml buffers wrapping read-only host memory (e.g. an mmap opened with
# ACCESS_READ): writing there would crash the process, so Tensor.set refuses.
READONLY_BUFFERS: set[int] = set()


class _Lib:
    """The loaded libraries: one attribute per declared C function."""

    def __init__(self, lib_dir: Path, handles: dict[str, ctypes.CDLL]):
        self.lib_dir = lib_dir
        self.handles = handles
        self.missing_optional: list[str] = []
        self.version = ""
        self.commit = ""
        self.loaded_backend_plugins = False


_LIB: _Lib | None = None
_LOCK = threading.Lock()


def _fix_hint(lib_dir: Path | None, from_env: bool) -> str:
    if from_env:
        return (
            f"fix {ENV_LIB_DIR} (now {os.environ.get(ENV_LIB_DIR)!r}) to point at a directory with "
            f"libggml-base, libggml-cpu and libggml built from {GGML_VERSION_PIN}, or unset it"
        )
    return f"run: pip install --force-reinstall {GGML_VERSION_PIN}"


def _shared_lib_name(stem: str) -> str:
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    if sys.platform == "win32":
        return f"{stem}.dll"
    return f"lib{stem}.so"


def find_lib_dir() -> tuple[Path, bool]:
    """Directory holding libggml*, and whether it came from ``$TIDE_GGML_LIB_DIR``.

    Does not import ``llama_cpp`` (that would load libllama, which we do not need).
    """
    env = os.environ.get(ENV_LIB_DIR)
    if env:
        return Path(env).expanduser(), True
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGMLLibraryError(
            f"llama-cpp-python is not installed, so libggml cannot be found; {_fix_hint(None, False)}"
            f" (or set {ENV_LIB_DIR} to a directory with a matching libggml build)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "lib", False


USER_OMP_WAIT_POLICY: str | None = None  # the environment's own value, before our default


def _load_libraries(lib_dir: Path, from_env: bool) -> dict[str, ctypes.CDLL]:
    if not lib_dir.is_dir():
        raise GGMLLibraryError(f"libggml directory {lib_dir} does not exist; {_fix_hint(lib_dir, from_env)}")
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    # ggml's CPU backend runs on OpenMP. Its threads spin between graphs by default; we run
    # dozens of small graphs per step and a CPU expert worker beside them, and spinning
    # threads that lose their core slow everything by orders of magnitude. Sleeping costs
    # a wake-up per graph. A user's own setting wins.
    global USER_OMP_WAIT_POLICY
    USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    handles: dict[str, ctypes.CDLL] = {}
    for stem, required in (("ggml-base", True), ("ggml-cpu", False), ("ggml", True)):
        path = lib_dir / _shared_lib_name(stem)
        if not path.exists():
            if required:
                raise GGMLLibraryError(f"{path.name} not found in {lib_dir}; {_fix_hint(lib_dir, from_env)}")
            continue
        try:
            handles[stem] = ctypes.CDLL(str(path), mode=mode)
        except OSError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GGMLLibraryError(
                f"cannot load {path}: {detail}; {_fix_hint(lib_dir, from_env)}"
            ) from None
    return handles


def _declare(lib: _Lib, handles: dict[str, ctypes.CDLL], from_env: bool) -> None:
    # Look symbols up in libggml first (its dependency scope covers ggml-base and, in
    # the default build, ggml-cpu), then in the others.
    order = [handles[k] for k in ("ggml", "ggml-base", "ggml-cpu") if k in handles]
    missing = []

    def resolve(name, restype, argtypes):
        for h in order:
            try:
                fn = getattr(h, name)
            except AttributeError:
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            return fn
        return None

    for name, (restype, argtypes) in _REQUIRED.items():
        fn = resolve(name, restype, argtypes)
        if fn is None:
            missing.append(name)
        else:
            setattr(lib, name, fn)
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise GGMLLibraryError(
            f"libggml in {lib.lib_dir} is a different version (missing {shown}); {_fix_hint(lib.lib_dir, from_env)}"
        )
    for name, (restype, argtypes) in _OPTIONAL.items():
        fn = resolve(name, restype, argtypes)
        setattr(lib, name, fn)
        if fn is None:
            lib.missing_optional.append(name)


def _check_abi(lib: _Lib, from_env: bool) -> None:
    overhead = lib.ggml_tensor_overhead()
    expected = GGML_OBJECT_SIZE + GGML_TENSOR_SIZE
    if overhead != expected:
        raise GGMLLibraryError(
            f"libggml in {lib.lib_dir} has a different struct ggml_tensor layout "
            f"(ggml_tensor_overhead()={overhead}, expected {expected}); {_fix_hint(lib.lib_dir, from_env)}"
        )
    for type_id, name in _TYPE_NAME_CHECKS.items():
        got = lib.ggml_type_name(type_id)
        if got is None or got.decode() != name:
            raise GGMLLibraryError(
                f"libggml in {lib.lib_dir} numbers its tensor types differently "
                f"(type {type_id} is {got!r}, expected {name!r}); {_fix_hint(lib.lib_dir, from_env)}"
            )


def _ensure_backends(lib: _Lib) -> None:
    # Default build: backends are linked in and registered statically. GGML_BACKEND_DL
    # build: nothing is registered until the plugins are loaded from the directory.
    if lib.ggml_backend_dev_by_type(DEV_TYPE_CPU):
        return
    lib.ggml_backend_load_all_from_path(str(lib.lib_dir).encode())
    lib.loaded_backend_plugins = True


def load() -> _Lib:
    """Load libggml (once) and return the declared functions. Thread-safe."""
    global _LIB
    if _LIB is not None:
        return _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        lib_dir, from_env = find_lib_dir()
        handles = _load_libraries(lib_dir, from_env)
        lib = _Lib(lib_dir, handles)
        _declare(lib, handles, from_env)
        _check_abi(lib, from_env)
        if lib.ggml_version is not None:
            lib.version = (lib.ggml_version() or b"").decode()
        if lib.ggml_commit is not None:
            lib.commit = (lib.ggml_commit() or b"").decode()
        from tide_local.ggml import _log  # noqa: PLC0415 (route logs before backends print)

        _log.install_default(lib)
        _ensure_backends(lib)
        if not lib.ggml_backend_dev_by_type(DEV_TYPE_CPU):
            raise GGMLLibraryError(
                f"libggml in {lib.lib_dir} registers no CPU backend; {_fix_hint(lib_dir, from_env)}"
            )
        _LIB = lib
        return lib


def is_loaded() -> bool:
    return _LIB is not None
