"""Where tide-local keeps its files (profiles, plans, traces), and how it writes them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$TIDE_CACHE_DIR, else $XDG_CACHE_HOME/tide-local, else ~/.cache/tide-local."""
    explicit = os.environ.get("TIDE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tide-local"


def write_json_atomically(path, data, indent: int | None = 1) -> None:
    """Write `data` as JSON to a temporary file beside `path` (a unique name, so concurrent
    saves do not collide), then rename it into place; on any failure the temporary file is
    removed and `path` is untouched. Through a symlink, its target is replaced."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    text = json.dumps(data, indent=indent, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
