"""Small helpers every layer shares (one copy each)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for integers (b > 0): e.g. the blocks that hold a tokens."""
    return -(-a // b)


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming `name` unless value is an int > 0 (bool is not an int here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
