"""Helpers for custom-op backward passes: ``torch.library`` ops return tensors, never None, and their
outputs may not alias one another or an input."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def pack(grads: Sequence[torch.Tensor | None], like: torch.Tensor,
         inputs: Iterable[torch.Tensor | None] = ()) -> list[torch.Tensor]:
    """Replace each None by an empty tensor and copy any gradient that shares memory with an earlier one
    or with one of ``inputs`` (e.g. slices of one GEMM's output), or that is not a dense tensor starting
    at its storage's beginning (what the fake implementations promise: ``torch.library.opcheck`` compares
    strides and storage offsets), so the list can leave a custom op."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    out = []
    for g in grads:
        if g is None:
            out.append(like.new_empty(0))
            continue
        if g.numel():
            ptr = g.untyped_storage().data_ptr()
            if ptr in seen or g.storage_offset() or not g.is_contiguous():
                g = g.clone(memory_format=torch.contiguous_format)
                ptr = g.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(g)
    return out


def unpack(grads: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """The inverse of :func:`pack`: None wherever the gradient was not asked for."""
    return [g if need else None for g, need in zip(grads, needs)]


def fake(shape_dtypes: Sequence[tuple[Sequence[int], torch.dtype] | None], needs: Sequence[bool],
         like: torch.Tensor) -> list[torch.Tensor]:
    """Fake (meta) gradients: ``(shape, dtype)`` where needed, empty placeholders elsewhere."""
    return [like.new_empty(sd[0], dtype=sd[1]) if (need and sd is not None) else like.new_empty(0)
            for sd, need in zip(shape_dtypes, needs)]
