"""Named benchmark shapes: Qwen2 FFN projections, MedCare's stage-1 expert settings, token counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_out: int
    experts: int = 8
    rank: int = 16
    top_k: int = 2
    shared_rank: int = 32


#: CPU table (issue: fp32 on CPU, Qwen2-0.5B and 1.5B up/gate projections).
CPU_SHAPES = (Shape("qwen2-0.5b", 896, 4864), Shape("qwen2-1.5b", 1536, 8960))
CPU_TOKENS = (1, 128, 1024)

#: GPU table (bf16): Qwen2-7B FFN up/gate (3584 -> 18944) and down (18944 -> 3584).
GPU_SHAPES = (Shape("qwen2-7b-up", 3584, 18944), Shape("qwen2-7b-down", 18944, 3584))
GPU_TOKENS = (1, 16, 4096, 16384)

#: --quick: a small shape that finishes in seconds anywhere: one decode point (T=1, host-bound: every
#: method's time is per-call overhead, and the table flags it) and one where the arithmetic shows (T=256).
QUICK_SHAPES = (Shape("small", 256, 512, experts=8, rank=8, top_k=2, shared_rank=16),)
QUICK_TOKENS = (1, 256)

#: The per-op table's --quick decode shape (the Triton interpreter runs it in the tests: keep it tiny).
TINY_SHAPES = (Shape("tiny", 64, 96, experts=4, rank=4, top_k=2, shared_rank=8),)
