"""pytest-benchmark suite for the MoLoRA layer: ``pytest benchmarks --benchmark-only``.

Each case times forward or forward+backward of one method at one point of the CPU table (fp32) or,
on a GPU, of the GPU table (bf16). Compare runs with ``--benchmark-autosave`` / ``--benchmark-compare``.
"""

from __future__ import annotations

import pytest
import torch

from medcare_kernels.bench.methods import make_inputs, methods
from medcare_kernels.bench.runner import _step
from medcare_kernels.bench.shapes import CPU_SHAPES, CPU_TOKENS, GPU_SHAPES, GPU_TOKENS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES, TOKENS = (GPU_SHAPES, GPU_TOKENS) if DEVICE == "cuda" else (CPU_SHAPES, CPU_TOKENS)
METHODS = {m.name: m for m in methods(DEVICE)}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("method", list(METHODS))
def test_molora_layer(benchmark, method, shape, tokens, backward):
    m = METHODS[method]
    inp = make_inputs(shape, tokens, DTYPE, DEVICE)
    step = _step(m, inp, backward)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        step()
        sync()

    benchmark.group = f"{shape.name} T={tokens} {'fwd+bwd' if backward else 'fwd'}"
    with m.environment():
        benchmark.pedantic(run, warmup_rounds=1, rounds=5 if DEVICE == "cpu" else 20)
