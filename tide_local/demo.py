"""The demo model: a tiny LLaDA2 GGUF with random weights, built on first use and cached.

It lets `tide generate --demo` (and anyone trying the API) run the whole pipeline with no
download. Its weights are random, so its output is noise. It is built deterministically
(the random test checkpoint of :mod:`tide_local.converters.testmodel` with a fixed seed,
converted to q8_0) into the user cache directory:

* ``$TIDE_CACHE_DIR`` if set,
* else ``$XDG_CACHE_HOME/tide-local``,
* else ``~/.cache/tide-local``.

The file name carries a version (:data:`DEMO_VERSION` and the GGUF layout version), so a
format change builds a new file. Each build works in its own temporary directory inside
the cache directory and moves the finished file into place with one atomic rename, so
processes racing to build it are safe (they write identical files).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tide_local import architecture
from tide_local.errors import OutputPathError, TideError
from tide_local.paths import cache_dir  # noqa: F401 (where the demo model is cached)

# Bump when the demo checkpoint or its conversion changes.
DEMO_VERSION = 1
DEMO_SEED = 2025
DEMO_PRESET = "tiny"
DEMO_TYPE = "q8_0"

NOTE = "building the demo model (random weights: its output is noise) ..."


def demo_file_name() -> str:
    return f"demo-llada2-{DEMO_PRESET}-v{DEMO_VERSION}-layout{architecture.LAYOUT_VERSION}-{DEMO_TYPE}.gguf"


def _usable(path: Path) -> bool:
    if not path.is_file():
        return False
    from tide_local.modelfile import ModelFile

    try:
        with ModelFile(path):
            return True
    except TideError:  # truncated or from an older format: build it again
        return False


BUILD_PREFIX = ".demo-build-"
_LOCK_NAME = "building.lock"  # held (flock) while a build runs in its folder


def _remove_stale_builds(directory: Path) -> None:
    """Remove the build folders of earlier builds that were killed (SIGKILL, power cut): those
    whose lock nobody holds (or that never got one and are an hour old)."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(BUILD_PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            lock = Path(entry.path) / _LOCK_NAME
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > 3600:
                    shutil.rmtree(entry.path, ignore_errors=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # a build writes its pid once it holds the lock: an empty file may be one starting
                stale = os.fstat(fd).st_size > 0 or time.time() - os.fstat(fd).st_mtime > 3600
            except OSError:
                continue  # a build in progress
            finally:
                os.close(fd)
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def build_demo_model(out: str | os.PathLike, *, seed: int = DEMO_SEED) -> Path:
    """Write the demo GGUF to ``out`` (via a temporary directory beside it and a rename).
    A SIGTERM, SIGHUP, ... during the build removes the temporary directory as Ctrl-C does;
    what a SIGKILL leaves is removed by the next build."""
    from tide_local.converters.convert import convert
    from tide_local.converters.testmodel import make_checkpoint
    from tide_local.gguf.writer import interrupt_on_signals

    out = Path(out)
    _remove_stale_builds(out.parent)
    with interrupt_on_signals(), tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, dir=out.parent) as tmp:
        with open(Path(tmp) / _LOCK_NAME, "wb") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:
                pass
            lock.write(str(os.getpid()).encode())
            lock.flush()
            hf_dir = make_checkpoint(Path(tmp) / "hf", preset=DEMO_PRESET, seed=seed)
            gguf = Path(tmp) / out.name
            convert(hf_dir, gguf, DEMO_TYPE, threads=1, progress=False, log=io.StringIO())
            os.replace(gguf, out)
    return out


def demo_model_path(progress: bool = True) -> Path:
    """The cached demo GGUF, built first if missing (prints a one-line note on stderr then)."""
    directory = cache_dir()
    path = directory / demo_file_name()
    if _usable(path):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"cannot create the cache directory {directory} ({err.strerror}); set TIDE_CACHE_DIR to a writable folder"
        ) from None
    if not os.access(directory, os.W_OK):
        raise OutputPathError(f"the cache directory {directory} is not writable; set TIDE_CACHE_DIR to a writable folder")
    if progress:
        print(NOTE, file=sys.stderr, flush=True)
    return build_demo_model(path)
