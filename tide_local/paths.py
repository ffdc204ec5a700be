"""Where tide-local keeps its files: the demo model, profiles, plans and traces."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TIDE_CACHE_DIR, else $XDG_CACHE_HOME/tide-local, else ~/.cache/tide-local."""
    explicit = os.environ.get("TIDE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tide-local"
