"""medcare-kernels: fused kernels for Mixture-of-LoRA-experts training (MedCare, EMNLP 2024 Findings).

Public ops (each a ``torch.library`` custom op with a fake implementation and an autograd formula):

* :func:`molora_linear` - frozen linear + top-k routed LoRA experts + shared experts (stage 1)
* :func:`lora_linear` - frozen linear + one LoRA (attention in stage 1, base + orth LoRA in stage 2)
* :func:`route` - float32 softmax, top-k (ties to the lower index), renormalise
* :func:`orthogonal_penalty` - ``sum_l sum(abs(A_base_l @ A_orth_l.T))`` over ragged layers

:func:`available_backends` lists what can run here; ``backend="auto"`` (or ``MEDCARE_BACKEND``) picks.
"""

from medcare_kernels._version import __version__
from medcare_kernels.backends import BACKENDS, BackendUnavailableError, available_backends
from medcare_kernels.ops.lora_linear import lora_linear
from medcare_kernels.ops.molora_linear import molora_linear
from medcare_kernels.ops.orthogonal_penalty import orthogonal_penalty
from medcare_kernels.ops.route import route

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "lora_linear",
    "molora_linear",
    "orthogonal_penalty",
    "route",
]
