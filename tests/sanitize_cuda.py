"""One small run of each compiled CUDA kernel, for compute-sanitizer (memcheck, racecheck) in
``make gpu-check``: ``compute-sanitizer --tool memcheck python -m tests.sanitize_cuda``.

Shapes are small but exercise the edge paths: partial tiles and warps, more than one d-chunk in the
penalty, vectorised and scalar loads in the decode kernels, r_s = 0, float16/bfloat16/float32.
"""

from __future__ import annotations

import torch

import medcare_kernels  # noqa: F401  (loads the extension)
from medcare_kernels import _extension

ops = torch.ops.medcare_kernels


def main() -> None:
    reason = _extension.unavailable_reason("cuda")
    if reason:
        raise SystemExit(f"cannot run the CUDA kernels: {reason}")
    dev = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(37, 9, device=dev, dtype=dtype)
        w, i = ops.route_fwd_cuda(logits, 3)
        ops.route_bwd_cuda(torch.randn_like(w), logits, w, i)
        ops.route_fwd_cuda(torch.randn(5, 70, device=dev, dtype=dtype), 40)  # k > 32, E > 64

        base = [torch.randn(r1, d, device=dev, dtype=dtype) for r1, d in ((33, 2100), (4, 7), (1, 1))]
        orth = [torch.randn(r2, d, device=dev, dtype=dtype) for r2, d in ((40, 2100), (4, 7), (1, 1))]
        ops.orthogonal_penalty_fwd_cuda(base, orth)
        ops.orthogonal_penalty_bwd_cuda(torch.ones((), device=dev), base, orth, True, True)

        for d_in, r, r_s, T, p in ((40, 16, 32, 5, dtype), (33, 3, 0, 2, torch.float32)):
            E, d_out, k = 6, 300, 2
            x = torch.randn(T, d_in, device=dev, dtype=dtype)

            def rand(*s, p=p):
                return torch.randn(*s, device=dev, dtype=p)
            ops.molora_decode_cuda(x, torch.randn(d_out, d_in, device=dev, dtype=dtype), None, rand(E, d_in),
                                   rand(E), rand(E, r, d_in), rand(E, d_out, r), rand(r_s, d_in) if r_s else None,
                                   rand(d_out, r_s) if r_s else None, torch.randn_like(x), k, 0.5)
    torch.cuda.synchronize()
    print("ran every compiled kernel once")


if __name__ == "__main__":
    main()
