"""Where ggml's log lines go.

By default (installed when libggml loads) they go to the Python logger
``tide_local.ggml``: debug/info lines at DEBUG/INFO (invisible unless logging is
configured), warnings and errors at WARNING/ERROR. ``set_log_mode("silent")`` drops
everything, ``"stderr"`` restores ggml's own printing to stderr.
"""

from __future__ import annotations

import atexit
import logging
import threading

from tide_local.ggml import _lib

logger = logging.getLogger("tide_local.ggml")

_PY_LEVEL = {
    _lib.LOG_NONE: logging.INFO,
    _lib.LOG_DEBUG: logging.DEBUG,
    _lib.LOG_INFO: logging.INFO,
    _lib.LOG_WARN: logging.WARNING,
    _lib.LOG_ERROR: logging.ERROR,
}

_state = {"mode": "python", "level": logging.INFO, "partial": ""}
_lock = threading.Lock()


def _to_python(level: int, text: bytes | None, _user_data) -> None:
    try:
        msg = (text or b"").decode("utf-8", "replace")
        with _lock:
            if level != _lib.LOG_CONT:
                _state["level"] = _PY_LEVEL.get(level, logging.INFO)
            buf = _state["partial"] + msg
            if not buf.endswith("\n"):
                _state["partial"] = buf
                return
            _state["partial"] = ""
            py_level = _state["level"]
        for line in buf.rstrip("\n").splitlines():
            logger.log(py_level, "%s", line)
    except Exception:  # noqa: BLE001 - never raise into C
        pass


def _drop(_level, _text, _user_data) -> None:
    return None


# Callbacks must outlive every call from C: keep them at module level.
_PY_CALLBACK = _lib.ggml_log_callback(_to_python)
_SILENT_CALLBACK = _lib.ggml_log_callback(_drop)
_STDERR = _lib.ggml_log_callback()  # NULL: ggml prints to stderr itself


def _apply(lib, mode: str) -> None:
    cb = {"python": _PY_CALLBACK, "silent": _SILENT_CALLBACK, "stderr": _STDERR}[mode]
    lib.ggml_log_set(cb, None)
    _state["mode"] = mode


def _at_exit() -> None:
    # No Python callbacks from C while the interpreter shuts down.
    if _lib.is_loaded():
        _lib.load().ggml_log_set(_STDERR, None)


def install_default(lib) -> None:
    _apply(lib, _state["mode"])
    atexit.register(_at_exit)


def set_log_mode(mode: str) -> None:
    """Route ggml logs: ``"python"`` (logger ``tide_local.ggml``), ``"silent"`` or ``"stderr"``."""
    if mode not in ("python", "silent", "stderr"):
        raise ValueError(f"log mode must be 'python', 'silent' or 'stderr', not {mode!r}")
    if _lib.is_loaded():
        _apply(_lib.load(), mode)
    else:
        _state["mode"] = mode  # applied when the library loads


def get_log_mode() -> str:
    return _state["mode"]
