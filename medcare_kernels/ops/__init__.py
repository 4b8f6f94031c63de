"""The public ops. Each file: argument checks -> ``resolve_backend`` -> :func:`medcare_kernels.ops._run.call`,
which runs the backend through the op's ``torch.autograd.Function`` in eager mode, or through its
``torch.library`` custom op (fake implementation, registered autograd formula) under ``torch.compile``.

Backend contract (what a backend module provides for each op; T = tokens, all 2-D inputs contiguous):

``route``
    ``forward(logits [T, E], top_k) -> (weights [T, k] acc, indices [T, k] int64)``
    ``backward(grad_weights [T, k], logits, weights, indices) -> grad_logits [T, E] acc``
``molora_linear``
    ``forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
    top_k, scaling) -> (y [T, d_out] x.dtype, logits [T, E] acc, weights [T, k] acc, indices [T, k] int64,
    z [T, k*r + r_s] acc)`` where z holds the chosen experts' shrink outputs ``lora_x @ A_e.T`` in slot
    order (token t, choice j), then the shared shrink ``lora_x @ A_s.T``.
    ``backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B,
    logits, weights, indices, z, top_k, scaling, needs) -> 10 grads`` for (x, weight, bias, router_weight,
    router_bias, lora_A, lora_B, shared_A, shared_B, lora_x), None where not needed.
``lora_linear``
    ``forward(x, weight, bias, lora_A, lora_B, lora_x, scaling) -> (y, z [T, r] acc)``
    ``backward(grad_y, x, lora_x, weight, lora_A, lora_B, z, scaling, needs) -> 6 grads`` for
    (x, weight, bias, lora_A, lora_B, lora_x).
``orthogonal_penalty``
    ``forward(base_A list, orth_A list) -> 0-d acc``; ``backward(grad, base_A, orth_A, needs[2]) ->
    (list, list)``.

``acc`` is float32, or float64 when the inputs are float64. Gradients come back in their input's dtype.
"""
