"""``lora_linear`` for the cuda backend: the torch backend's functions (a base GEMM plus two thin GEMMs,
nothing a custom kernel improves on today)."""

from medcare_kernels.backends.pytorch.lora_linear import backward, forward

__all__ = ["backward", "forward"]
