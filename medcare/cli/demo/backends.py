"""Which ``medcare_kernels`` backend each op ran on during the demo.

``recording_backends`` wraps ``resolve_backend`` inside each op module while the block runs (a stopgap until
``medcare_kernels`` has a supported registry API for recording which backend ran).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["recording_backends"]


@contextlib.contextmanager
def recording_backends() -> Iterator[dict[str, set[str]]]:
    """Records which backend each ``medcare_kernels`` op resolved to while the block runs."""
    used: dict[str, set[str]] = {}
    patched = []
    for op in ("molora_linear", "lora_linear", "orthogonal_penalty", "route"):
        try:
            mod = importlib.import_module(f"medcare_kernels.ops.{op}")
        except ImportError:
            continue
        original = getattr(mod, "resolve_backend", None)
        if original is None:
            continue

        def wrapper(*args: Any, _original: Any = original, _op: str = op, **kwargs: Any) -> str:
            backend = _original(*args, **kwargs)
            used.setdefault(_op, set()).add(backend)
            return backend

        mod.resolve_backend = wrapper
        patched.append((mod, original))
    try:
        yield used
    finally:
        for mod, original in patched:
            mod.resolve_backend = original
