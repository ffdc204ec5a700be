"""Byte sizes and durations as people read and write them: '6GiB' in, '6.0 GiB' out."""

from __future__ import annotations

import re

# Decimal (kB, MB, GB, TB, or just k, M, G, T) and binary (KiB, MiB, GiB, TiB) units, any case.
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(value: int | float | str, *, what: str = "size", allow_zero: bool = False) -> int:
    """Bytes from a number or a string such as '6GiB' (2^30), '5GB' (10^9), '1.5kb' or '512'.

    Raises ValueError naming `what` for text it cannot read, a negative size, or zero
    unless `allow_zero`.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = -1 if value < 0 else int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {what} '{value}' (write e.g. 6GiB, 500MB or a number of bytes)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError(f"{what} must be positive (got {value})")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(max(0, s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
