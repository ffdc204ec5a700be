"""A non-editable install ships every package: pyproject's list matches the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, src in cfg["package-dir"].items():  # tide_local, and the folders mapped into it
        base = ROOT / src
        for init in base.rglob("__init__.py"):
            dotted = ".".join([name, *init.parent.relative_to(base).parts])
            # a folder mapped on its own (converters/, tui/) is counted under its own mapping only
            if not any(dotted.startswith(other + ".") or dotted == other
                       for other, other_src in cfg["package-dir"].items() if other != name and other.startswith(name)):
                found.add(dotted)
    assert found - set(cfg["packages"]) == set(), f"packages missing from pyproject.toml: {sorted(found - set(cfg['packages']))}"
